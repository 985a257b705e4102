// One thread, one format, one kernel at a time: the speed of a backend's
// gate/up and down kernels on one expert's matrices, outside the layer (no
// routing, no encodings, no thread pool). The tool for tuning tile shapes and
// prefetching; the layer bench (bench/run.sh) is the one that counts.
//
//   bench_kernels [--backend avx512] [--format int4_g128,int8,bf16,...]
//                 [--shape 768x2048,1408x2048] [--gemv 1,2,4] [--gemm 64,256] [--reps 5]
//                 [--next-hint 0|1] [--gather R]
//
// GEMV (decode, few tokens): each call runs on the next of enough experts
// (copies of one) to fill ~384 MiB, so the weights come from memory; GB/s of
// packed weights, best of --reps passes, next to the read probe's 1-thread
// GB/s measured in the same run. GEMM (prefill): GOP/s (2 per multiply-add)
// cycling over the same experts, best of --reps. --next-hint 1 (the default)
// tells each down call which expert comes next (PackedMatrixView::
// next_weights), as the layer does; 0 leaves it out. --gather R: each GEMM
// gate/up call reads its m activation rows through a row index, m of R
// encoded rows picked at random in increasing order, as the layer gathers an
// expert's tokens from the call's T rows (0, the default: m contiguous rows).
// `--shape IxH`: gate/up are I x H, down H x I.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "bandwidth_probe.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/pack.h"
#include "thread_pool.h"
#include "topology.h"

using namespace kt;

namespace {

struct Format {
  std::string name;
  QuantScheme scheme;
  uint32_t group;
};

const Format kFormats[] = {{"bf16", QuantScheme::kBF16, 0},        {"int8", QuantScheme::kInt8PerChannel, 0},
                           {"int8_g32", QuantScheme::kInt8Group, 32}, {"int8_g128", QuantScheme::kInt8Group, 128}, {"int4", QuantScheme::kInt4Sym, 0},
                           {"int4_g32", QuantScheme::kInt4Sym, 32},  {"int4_g128", QuantScheme::kInt4Sym, 128},
                           {"int4m_g32", QuantScheme::kInt4Asym, 32}, {"fp8_g128", QuantScheme::kFP8Block, 128}};

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b <= s.size()) {
    const size_t e = std::min(s.find(',', b), s.size());
    if (e > b) out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

// A comma list of token counts; exits with a message on anything but positive integers.
std::vector<size_t> split_sizes(const std::string& s) {
  std::vector<size_t> out;
  for (const std::string& v : split(s)) {
    char* end = nullptr;
    const unsigned long n = std::strtoul(v.c_str(), &end, 10);
    if (n == 0 || *end != '\0') {
      std::fprintf(stderr, "bench_kernels: token counts must be positive integers, got %s\n", v.c_str());
      std::exit(2);
    }
    out.push_back(n);
  }
  return out;
}

// One matrix packed in a format, plus E - 1 byte copies (distinct memory,
// same values: the kernels' speed does not depend on the values), all in one
// buffer as the layer stores its experts. One buffer per copy would leave
// matrices under 2 MiB (INT8 and INT4 at Qwen3's shape) on 4 KiB pages while
// the layer's are on huge pages: their GEMV then read 80-87% of the probe
// against BF16's 93-96%, a difference of page size, not of kernel.
struct Matrices {
  PackedGeometry geo;
  AlignedBuffer buf;
  std::vector<PackedMatrixView> views;
};

void make_matrices(const Format& f, uint32_t rows, uint32_t cols, size_t copies, std::mt19937& rng, Matrices* m) {
  if (!packed_geometry(f.scheme, rows, cols, f.group, &m->geo)) {
    std::fprintf(stderr, "bench_kernels: %s cannot pack %u x %u\n", f.name.c_str(), rows, cols);
    std::exit(2);
  }
  std::vector<float> w(size_t(rows) * cols);
  std::normal_distribution<float> d;
  for (float& v : w) v = d(rng);
  const size_t stride = (m->geo.total_bytes + 63) / 64 * 64;
  m->buf = AlignedBuffer(stride * copies);
  pack_matrix(f.scheme, m->geo, w.data(), DType::kF32, cols, m->buf.data());
  for (size_t e = 1; e < copies; ++e) std::memcpy(m->buf.data() + e * stride, m->buf.data(), m->geo.total_bytes);
  for (size_t e = 0; e < copies; ++e)
    m->views.push_back(make_packed_view(f.scheme, m->geo, m->buf.data() + e * stride));
}

// Encoded activation rows of one format: `rows` rows of k columns.
struct Acts {
  std::vector<uint8_t> data;
  std::vector<float> scale;
  std::vector<int32_t> sums;
  ActsView view;
};

void make_acts(const FormatKernels& fk, QuantScheme s, size_t rows, size_t k, std::mt19937& rng, Acts* a) {
  std::vector<float> x(rows * k);
  std::normal_distribution<float> d;
  for (float& v : x) v = d(rng);
  ActsBuffer b;
  b.row_bytes = acts_row_bytes(s, k);
  b.group_sums_stride = acts_group_sums_per_row(s, k);
  a->data.assign(rows * b.row_bytes, 0);
  a->scale.assign(rows, 0.0f);
  a->sums.assign(rows * b.group_sums_stride + 1, 0);
  b.data = a->data.data();
  b.row_scale = a->scale.data();
  b.group_sums = a->sums.data();
  fk.prepare_acts(x.data(), rows, k, k, b);
  a->view.data = b.data;
  a->view.row_bytes = b.row_bytes;
  a->view.row_scale = b.row_scale;
  a->view.group_sums = b.group_sums_stride ? b.group_sums : nullptr;
  a->view.group_sums_stride = b.group_sums_stride;
  a->view.rows = rows;
}

}  // namespace

int run(int argc, char** argv) {
  std::string backend = "avx512", formats = "int4_g128,int8,bf16", shapes = "768x2048,1408x2048";
  std::string gemv = "1,2,4", gemm = "64,256";
  int reps = 5;
  bool next_hint = true;
  size_t gather = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--backend") backend = v;
    else if (k == "--format") formats = v;
    else if (k == "--shape") shapes = v;
    else if (k == "--gemv") gemv = v;
    else if (k == "--gemm") gemm = v;
    else if (k == "--reps") reps = std::max(1, std::atoi(v.c_str()));
    else if (k == "--next-hint") {
      if (v != "0" && v != "1") {
        std::fprintf(stderr, "bench_kernels: --next-hint takes 0 or 1, got %s\n", v.c_str());
        return 2;
      }
      next_hint = v == "1";
    }
    else if (k == "--gather") {
      char* end = nullptr;
      const unsigned long r = std::strtoul(v.c_str(), &end, 10);
      if (v.empty() || *end || v[0] == '-') {
        std::fprintf(stderr, "bench_kernels: --gather takes a row count, got %s\n", v.c_str());
        return 2;
      }
      gather = r;
    }
    else {
      std::fprintf(stderr, "bench_kernels: unknown option %s (see the comment at the top of bench/cpp/kernels.cpp)\n",
                   k.c_str());
      return 2;
    }
  }
  if (!backend_unavailable_reason(backend).empty()) {
    std::fprintf(stderr, "bench_kernels: backend %s: %s\n", backend.c_str(), backend_unavailable_reason(backend).c_str());
    return 2;
  }
  const KernelTable& kt = backend_kernels(backend);
  ThreadPool one(1, {topology().nodes.front().os_index}, false);
  const double roof = measure_read_bandwidth(one, size_t(1) << 30, 5);
  std::printf("backend %s; read probe, 1 thread: %.1f GB/s\n", kt.name, roof);
  std::mt19937 rng(1);
  for (const std::string& fname : split(formats)) {
    const Format* f = nullptr;
    for (const Format& c : kFormats)
      if (c.name == fname) f = &c;
    if (!f) {
      std::fprintf(stderr, "bench_kernels: unknown format %s\n", fname.c_str());
      return 2;
    }
    const FormatKernels& fk = kernels_for(kt, f->scheme);
    for (const std::string& shape : split(shapes)) {
      const size_t x = shape.find('x');
      const uint32_t I = uint32_t(std::strtoul(shape.c_str(), nullptr, 10));
      const uint32_t H = x == std::string::npos ? 0 : uint32_t(std::strtoul(shape.c_str() + x + 1, nullptr, 10));
      if (I == 0 || H == 0) {
        std::fprintf(stderr, "bench_kernels: --shape wants IxH with positive sizes, got %s\n", shape.c_str());
        return 2;
      }
      PackedGeometry gg, dg;
      packed_geometry(f->scheme, I, H, f->group, &gg);
      packed_geometry(f->scheme, H, I, f->group, &dg);
      const size_t expert_bytes = 2 * gg.total_bytes + dg.total_bytes;
      const size_t E = std::max<size_t>(2, (size_t(384) << 20) / expert_bytes + 1);
      Matrices G, U, D;
      make_matrices(*f, I, H, E, rng, &G);
      make_matrices(*f, I, H, E, rng, &U);
      make_matrices(*f, H, I, E, rng, &D);
      const std::vector<size_t> ms_gemv = split_sizes(gemv), ms_gemm = split_sizes(gemm);
      size_t max_m = 1;
      for (size_t m : ms_gemv) max_m = std::max(max_m, m);
      for (size_t m : ms_gemm) max_m = std::max(max_m, m);
      Acts ax, ah;
      make_acts(fk, f->scheme, std::max(max_m, gather), H, rng, &ax);
      make_acts(fk, f->scheme, max_m, I, rng, &ah);
      std::vector<float> h(max_m * I), out(max_m * size_t(H), 0.0f), rw(max_m, 0.5f);
      std::vector<float*> out_rows(max_m);
      for (size_t m = 0; m < max_m; ++m) out_rows[m] = out.data() + m * H;
      const ActivationParams act;
      const size_t gb = gg.rows_padded / kRowBlock, db = dg.rows_padded / kRowBlock;
      // Down call c runs on expert c % E; with the hint it names the next one.
      auto down_view = [&](size_t c) {
        PackedMatrixView v = D.views[c % E];
        if (next_hint) v.next_weights = D.views[(c + 1) % E].weights;
        return v;
      };
      for (size_t m : ms_gemv) {
        ax.view.rows = ah.view.rows = m;
        double gu = 0, dn = 0;
        for (int r = 0; r < reps; ++r) {
          double t0 = now_s();
          for (size_t e = 0; e < E; ++e) fk.gate_up(G.views[e], U.views[e], 0, gb, ax.view, act, h.data(), I);
          gu = std::max(gu, double(E) * 2 * gg.total_bytes / (now_s() - t0) / 1e9);
          t0 = now_s();
          for (size_t e = 0; e < E; ++e) fk.down(down_view(e), 0, db, ah.view, rw.data(), out_rows.data());
          dn = std::max(dn, double(E) * dg.total_bytes / (now_s() - t0) / 1e9);
        }
        std::printf("%-9s I=%-5u H=%-5u GEMV m=%-3zu gate_up %6.1f GB/s (%3.0f%%)  down %6.1f GB/s (%3.0f%%)\n",
                    f->name.c_str(), I, H, m, gu, 100 * gu / roof, dn, 100 * dn / roof);
      }
      std::vector<int32_t> row_index;
      for (size_t m : ms_gemm) {
        ax.view.rows = ah.view.rows = m;
        if (gather) {  // m of the gather rows, in increasing order (a selection sample)
          row_index.clear();
          for (size_t r = 0; r < gather && row_index.size() < m; ++r)
            if (std::uniform_int_distribution<size_t>(0, gather - r - 1)(rng) < m - row_index.size())
              row_index.push_back(int32_t(r));
          for (size_t r = 0; row_index.size() < m; ++r) row_index.push_back(int32_t(r % gather));  // m > gather
          ax.view.row_index = row_index.data();
        }
        const int calls = int(std::max<size_t>(2, 2000 / m));
        double gu = 0, dn = 0;
        for (int r = 0; r < reps; ++r) {
          double t0 = now_s();
          for (int c = 0; c < calls; ++c)
            fk.gate_up(G.views[size_t(c) % E], U.views[size_t(c) % E], 0, gb, ax.view, act, h.data(), I);
          gu = std::max(gu, 4.0 * I * H * m * calls / (now_s() - t0) / 1e9);
          t0 = now_s();
          for (int c = 0; c < calls; ++c) fk.down(down_view(size_t(c)), 0, db, ah.view, rw.data(), out_rows.data());
          dn = std::max(dn, 2.0 * I * H * m * calls / (now_s() - t0) / 1e9);
        }
        std::printf("%-9s I=%-5u H=%-5u GEMM m=%-3zu gate_up %7.1f GOP/s  down %7.1f GOP/s\n", f->name.c_str(), I, H,
                    m, gu, dn);
      }
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // an unknown backend name, an allocation failure
    std::fprintf(stderr, "bench_kernels: %s\n", e.what());
    return 2;
  }
}
