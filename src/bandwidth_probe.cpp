#include "bandwidth_probe.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "aligned_buffer.h"
#include "kt_kernel/cpu_features.h"
#include "thread_pool.h"

namespace kt {

uint64_t read_sum_u64__avx512(const uint64_t* p, size_t n);  // src/avx512/read_probe_avx512.cpp

namespace {

uint64_t read_sum_u64__baseline(const uint64_t* p, size_t n) {
  // Four independent accumulators: the loop vectorises at baseline flags.
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += p[i];
    a1 += p[i + 1];
    a2 += p[i + 2];
    a3 += p[i + 3];
  }
  for (; i < n; ++i) a0 += p[i];
  return a0 + a1 + a2 + a3;
}

}  // namespace

double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int reps) {
  const size_t words = std::max<size_t>(bytes / sizeof(uint64_t), 1 << 16);
  AlignedBuffer buf(words * sizeof(uint64_t));
  uint64_t* w = reinterpret_cast<uint64_t*>(buf.data());
  // Chunks of 2 MiB handed out by the pool: first touch by the readers' threads.
  const size_t chunk = (size_t(2) << 20) / sizeof(uint64_t);
  const size_t chunks = (words + chunk - 1) / chunk;
  pool.parallel_for(chunks, [&](size_t c, int) {
    for (size_t i = c * chunk, e = std::min(words, (c + 1) * chunk); i < e; ++i) w[i] = i;
  });
  // A probe, not a kernel: it picks its loop here rather than through the
  // kernel table (the widest loads this CPU has, as the kernels use).
  uint64_t (*read)(const uint64_t*, size_t) =
      cpu_features().avx512f ? &read_sum_u64__avx512 : &read_sum_u64__baseline;
  std::vector<uint64_t> sink(size_t(pool.num_threads()) * 8, 0);
  double best = 0;
  for (int r = 0; r < std::max(1, reps); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(chunks, [&](size_t c, int thread) {
      const size_t b = c * chunk, n = std::min(words, (c + 1) * chunk) - b;
      sink[size_t(thread) * 8] += read(w + b, n);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(words * sizeof(uint64_t)) / s / 1e9);
  }
  volatile uint64_t keep = 0;
  for (uint64_t v : sink) keep = keep + v;
  (void)keep;
  return best;
}

}  // namespace kt
