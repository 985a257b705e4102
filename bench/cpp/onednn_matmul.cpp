// The peer the MoE bench compares each expert against: one oneDNN matmul on
// the same per-expert shape, src [M, K] x weights [K, N] -> dst [M, N] f32.
//   int8: u8 activations x s8 weights, per-output-channel (N) scales
//   bf16: bf16 x bf16
//   f32:  f32 x f32
// The weights are given to oneDNN in the layout it prefers (format `any`,
// reordered once before timing), i.e. pre-packed as ours are. A MoE layer
// reads each active expert's weights from memory once per call, so the timed
// calls rotate over enough weight copies (--cold-mib in total, beyond the
// last-level cache) that every call streams its weights from DRAM too.
// Activation quantisation, SiLU and the combine are not timed: oneDNN gets
// the matmuls alone.
//
// Debian's libdnnl is built with OpenMP: the thread count is set with
// omp_set_num_threads, looked up at run time in the libgomp oneDNN loaded
// (the driver also exports OMP_NUM_THREADS).
//
//   bench_onednn_matmul --m 1[,2,...] --n N --k K --dtype {int8,bf16,f32}
//                       [--threads T] [--reps R] [--warmup W] [--max-ms MS]
//                       [--cold-mib MiB]
//
// Prints one JSON object on stdout: per M, the median and minimum time per
// call after warm-up, over up to R calls (fewer once MS of timed calls pass,
// but at least 5), the M values timed in turn, one call each per round.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

struct Options {
  std::vector<long> m;
  long n = 0, k = 0;
  std::string dtype = "int8";
  int threads = 1;
  int reps = 200;
  int warmup = 5;
  double max_ms = 1000;
  double cold_mib = 256;
};

std::vector<long> parse_list(const char* s) {
  std::vector<long> v;
  for (const char* p = s; *p;) {
    char* end = nullptr;
    const long x = std::strtol(p, &end, 10);
    if (end == p || x < 1) {
      std::fprintf(stderr, "onednn_matmul: bad list '%s'\n", s);
      std::exit(2);
    }
    v.push_back(x);
    p = *end == ',' ? end + 1 : end;
  }
  return v;
}

const char* isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::sse41: return "sse41";
    case dnnl::cpu_isa::avx: return "avx";
    case dnnl::cpu_isa::avx2: return "avx2";
    case dnnl::cpu_isa::avx2_vnni: return "avx2_vnni";
    case dnnl::cpu_isa::avx512_core: return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni: return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16: return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx: return "avx512_core_amx";
    default: return "other";
  }
}

// Fills a user-layout buffer of `count` elements of `type` with small random values.
void fill(void* p, size_t count, dt type, std::mt19937& rng) {
  std::uniform_int_distribution<int> small(-64, 63);
  for (size_t i = 0; i < count; ++i) {
    const int v = small(rng);
    switch (type) {
      case dt::u8: static_cast<uint8_t*>(p)[i] = uint8_t(v + 64); break;
      case dt::s8: static_cast<int8_t*>(p)[i] = int8_t(v); break;
      case dt::f32: static_cast<float*>(p)[i] = float(v) / 64.0f; break;
      case dt::bf16: {
        const float f = float(v) / 64.0f;
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        static_cast<uint16_t*>(p)[i] = uint16_t(bits >> 16);
        break;
      }
      default: break;
    }
  }
}

int set_omp_threads(int n) {
  using SetFn = void (*)(int);
  using GetFn = int (*)();
  auto set = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  auto get = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
  if (set) set(n);
  return get ? get() : -1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const bool has = i + 1 < argc;
    const char* a = argv[i];
    if (!std::strcmp(a, "--m") && has) o.m = parse_list(argv[++i]);
    else if (!std::strcmp(a, "--n") && has) o.n = std::atol(argv[++i]);
    else if (!std::strcmp(a, "--k") && has) o.k = std::atol(argv[++i]);
    else if (!std::strcmp(a, "--dtype") && has) o.dtype = argv[++i];
    else if (!std::strcmp(a, "--threads") && has) o.threads = std::max(1, std::atoi(argv[++i]));
    else if (!std::strcmp(a, "--reps") && has) o.reps = std::max(1, std::atoi(argv[++i]));
    else if (!std::strcmp(a, "--warmup") && has) o.warmup = std::max(0, std::atoi(argv[++i]));
    else if (!std::strcmp(a, "--max-ms") && has) o.max_ms = std::atof(argv[++i]);
    else if (!std::strcmp(a, "--cold-mib") && has) o.cold_mib = std::atof(argv[++i]);
    else {
      std::fprintf(stderr,
                   "usage: bench_onednn_matmul --m 1[,2,...] --n N --k K --dtype {int8,bf16,f32} [--threads T] "
                   "[--reps R] [--warmup W] [--max-ms MS] [--cold-mib MiB]\n");
      return 2;
    }
  }
  if (o.m.empty() || o.n < 1 || o.k < 1) {
    std::fprintf(stderr, "onednn_matmul: --m, --n and --k are required\n");
    return 2;
  }
  dt src_t, wei_t;
  if (o.dtype == "int8") src_t = dt::u8, wei_t = dt::s8;
  else if (o.dtype == "bf16") src_t = wei_t = dt::bf16;
  else if (o.dtype == "f32") src_t = wei_t = dt::f32;
  else {
    std::fprintf(stderr, "onednn_matmul: --dtype must be int8, bf16 or f32\n");
    return 2;
  }
  const int omp_threads = set_omp_threads(o.threads);

  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  std::mt19937 rng(1234);
  const long N = o.n, K = o.k;

  // Weights in the caller's layout: [N][K] row-major = dims {K, N} tag ba.
  const dnnl::memory::desc wei_user_md({K, N}, wei_t, tag::ba);
  dnnl::memory wei_user(wei_user_md, eng);
  fill(wei_user.get_data_handle(), size_t(K * N), wei_t, rng);
  std::vector<float> scales(static_cast<size_t>(N));
  for (long j = 0; j < N; ++j) scales[size_t(j)] = 0.001f * float(1 + j % 7);

  // Weight copies per packed layout (oneDNN may pick another layout for small M).
  struct WeightSet {
    dnnl::memory::desc md;
    std::vector<dnnl::memory> copies;
    size_t next = 0;
  };
  std::vector<WeightSet> sets;
  struct Case {
    long m;
    dnnl::matmul prim;
    std::string impl;
    size_t set;
    std::vector<std::unordered_map<int, dnnl::memory>> args;  // one per weight copy
    std::vector<double> us;
    double spent_ms = 0;
    bool active = true;
  };
  std::vector<Case> cases;
  for (const long M : o.m) {
    const dnnl::memory::desc src_md({M, K}, src_t, tag::ab);
    const dnnl::memory::desc wei_md({K, N}, wei_t, tag::any);
    const dnnl::memory::desc dst_md({M, N}, dt::f32, tag::ab);
    dnnl::primitive_attr attr;
    if (o.dtype == "int8") attr.set_output_scales(1 << 1, scales);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_md, dst_md), attr, eng);
    size_t set = 0;
    while (set < sets.size() && sets[set].md != pd.weights_desc()) ++set;
    if (set == sets.size()) {
      WeightSet ws;
      ws.md = pd.weights_desc();
      const double bytes = double(ws.md.get_size());
      const size_t count = size_t(std::clamp(std::ceil(o.cold_mib * 1048576.0 / bytes), 1.0, 512.0));
      for (size_t c = 0; c < count; ++c) {
        ws.copies.emplace_back(ws.md, eng);
        dnnl::reorder(wei_user, ws.copies.back()).execute(strm, wei_user, ws.copies.back());
      }
      strm.wait();
      sets.push_back(std::move(ws));
    }
    dnnl::memory src(src_md, eng), dst(dst_md, eng);
    fill(src.get_data_handle(), size_t(M * K), src_t, rng);
    Case c{M, dnnl::matmul(pd), pd.impl_info_str(), set, {}, {}};
    for (auto& w : sets[set].copies) c.args.push_back({{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst}});
    cases.push_back(std::move(c));
  }
  auto call = [&](Case& c) {
    WeightSet& ws = sets[c.set];
    c.prim.execute(strm, c.args[ws.next]);
    strm.wait();
    ws.next = (ws.next + 1) % ws.copies.size();
  };
  for (auto& c : cases)
    for (int w = 0; w < o.warmup; ++w) call(c);
  // Round robin over the M values, one timed call each per round: a burst of
  // load from elsewhere on a shared host spreads over all of them instead of
  // spoiling one.
  for (bool any = true; any;) {
    any = false;
    for (auto& c : cases) {
      if (!c.active) continue;
      const auto t0 = Clock::now();
      call(c);
      const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
      c.us.push_back(us);
      c.spent_ms += us / 1e3;
      c.active = int(c.us.size()) < o.reps && (c.us.size() < 5 || c.spent_ms <= o.max_ms);
      any = any || c.active;
    }
  }
  std::string results;
  for (size_t i = 0; i < cases.size(); ++i) {
    Case& c = cases[i];
    std::sort(c.us.begin(), c.us.end());
    const double med = c.us[c.us.size() / 2];
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "%s    {\"m\": %ld, \"median_us\": %.3f, \"min_us\": %.3f, \"reps\": %zu, \"weight_copies\": %zu, "
                  "\"gops\": %.3f, \"impl\": \"%s\"}",
                  i ? ",\n" : "", c.m, med, c.us.front(), c.us.size(), sets[c.set].copies.size(),
                  2.0 * double(c.m) * N * K / med / 1e3, c.impl.c_str());
    results += buf;
    std::fprintf(stderr, "onednn_matmul: %s M=%ld N=%ld K=%ld threads=%d: median %.1f us (%s)\n", o.dtype.c_str(), c.m,
                 N, K, o.threads, med, c.impl.c_str());
  }
  const dnnl_version_t* v = dnnl_version();
  std::printf("{\n  \"dtype\": \"%s\", \"n\": %ld, \"k\": %ld, \"threads\": %d, \"omp_max_threads\": %d,\n"
              "  \"onednn_version\": \"%d.%d.%d\", \"cpu_runtime\": \"%s\", \"isa\": \"%s\", \"cold_mib\": %.0f,\n"
              "  \"results\": [\n%s\n  ]\n}\n",
              o.dtype.c_str(), N, K, o.threads, omp_threads, v->major, v->minor, v->patch,
              v->cpu_runtime == DNNL_RUNTIME_OMP ? "omp" : (v->cpu_runtime == DNNL_RUNTIME_TBB ? "tbb" : "other"),
              isa_name(dnnl::get_effective_cpu_isa()), o.cold_mib, results.c_str());
  return 0;
}
