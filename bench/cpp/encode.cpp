// One thread, the activation encoders alone: a backend's prepare_acts on
// `rows` fp32 rows of k columns (INT8: u8 codes; INT4: s8 codes and sums),
// min and median of --reps calls, in microseconds. The layer runs them
// on x (k = hidden) and on the intermediate (k = moe_intermediate_size);
// bench/phase_profile.py shows them inside the layer, where they are a few
// percent of a prefill call and hard to time on a shared host.
//
//   bench_encode [--backend avx2] [--k 2048,768] [--rows 1024] [--reps 300]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/kernel_table.h"

using namespace kt;

namespace {

std::vector<size_t> sizes(const std::string& s) {
  std::vector<size_t> out;
  size_t b = 0;
  while (b < s.size()) {
    const size_t e = std::min(s.find(',', b), s.size());
    if (e > b) out.push_back(size_t(std::atol(s.substr(b, e - b).c_str())));
    b = e + 1;
  }
  return out;
}

int run(int argc, char** argv) {
  std::string backend = "", ks = "2048,768";
  size_t rows = 1024;
  int reps = 300;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--backend") backend = v;
    else if (k == "--k") ks = v;
    else if (k == "--rows") rows = size_t(std::max(1L, std::atol(v.c_str())));
    else if (k == "--reps") reps = std::max(1, std::atoi(v.c_str()));
    else {
      std::fprintf(stderr, "bench_encode: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  const KernelTable& kt = backend.empty() ? current_kernels() : backend_kernels(backend);
  std::printf("backend %s, %zu rows\n", kt.name, rows);
  for (const size_t k : sizes(ks)) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<float> x(rows * k);
    for (float& v : x) v = nd(rng);
    for (const QuantScheme s : {QuantScheme::kInt8PerChannel, QuantScheme::kInt4Sym}) {
      AlignedBuffer data(rows * acts_row_bytes(s, k));
      std::vector<float> scale(rows);
      std::vector<int32_t> sums(rows * acts_group_sums_per_row(s, k) + 1);
      ActsBuffer b;
      b.data = data.data();
      b.row_bytes = acts_row_bytes(s, k);
      b.row_scale = scale.data();
      b.group_sums = sums.data();
      b.group_sums_stride = acts_group_sums_per_row(s, k);
      const FormatKernels& fk = kernels_for(kt, s);
      std::vector<double> us;
      for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        fk.prepare_acts(x.data(), rows, k, k, b);
        us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(us.begin(), us.end());
      std::printf("k %5zu %-5s min %8.1f  median %8.1f us\n", k, s == QuantScheme::kInt8PerChannel ? "int8" : "int4",
                  us.front(), us[us.size() / 2]);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_encode: %s\n", e.what());
    return 1;
  }
}
