// The machine's own roofs, measured in the same run as the MoE bench: every
// kernel result is reported as a fraction of these, not of a datasheet.
//
//   read bandwidth   STREAM-like sum over a large array (default 1 GiB, far
//                    beyond the last-level cache), each thread reading its
//                    own contiguous slice; bytes read / wall time.
//   int8 VNNI peak   vpdpbusd zmm: 16 int32 lanes x 4 u8*s8 MACs = 64 MAC =
//                    128 ops per instruction.
//   bf16 peak        vdpbf16ps zmm: 16 fp32 lanes x 2 bf16 MACs = 32 MAC =
//                    64 flops per instruction.
//   fp32 FMA peak    vfmadd231ps zmm: 16 MAC = 32 flops per instruction.
// Work is handed out in chunks from an atomic counter, as the library's pool
// does, so a thread that a neighbour's process delays on a shared host does
// not hold the others back: the roofs are measured under the same conditions
// as the kernels they judge.
// Each compute probe keeps kAccumulators independent accumulators in flight,
// enough to cover latency x throughput on current cores (Zen 4/5, Sapphire
// Rapids: latency <= 5 cycles, <= 2 per cycle). Every probe runs with 1 thread
// and with each requested thread count; each figure is the best and the
// median of several repeats (the host may be shared: the best is the roof).
// A probe the CPU cannot run is reported as null: the binary checks support
// at run time and never executes an instruction the CPU lacks.
//
//   bench_probes [--threads 1,2] [--size-mib 1024] [--bw-repeats 20]
//                [--repeats 7] [--compute-ms 200] [--pin]
// (one pass over 1 GiB takes ~25 ms, so bandwidth repeats are cheap; many of
// them make the best figure robust against a neighbour's burst.)
//
// Prints one JSON object on stdout; progress goes to stderr.
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kAccumulators = 16;       // independent dependency chains per compute probe
constexpr int kInnerIters = 1024;       // instructions per chain between loop-count checks
constexpr size_t kReadChunk = 4 << 20;  // bytes per bandwidth work item (2 huge pages: few counter hits)
constexpr int kComputeChunks = 64;      // work items per thread in a compute probe
constexpr double kVnniOpsPerInst = 128;  // 64 MAC x 2
constexpr double kBf16OpsPerInst = 64;   // 32 MAC x 2
constexpr double kFmaOpsPerInst = 32;    // 16 MAC x 2

struct Options {
  std::vector<int> threads{1};
  size_t size_mib = 1024;
  int bw_repeats = 20;
  int repeats = 7;
  double compute_ms = 200;
  bool pin = false;
};

struct Summary {
  double best, median;
};

Summary summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v.back(), v[v.size() / 2]};
}

void pin_to(int i) {
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  if (cpus.empty()) return;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpus[size_t(i) % cpus.size()], &one);
  pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
}

// Runs body(thread) on n threads started together; returns the wall time in
// seconds from the common start to the last finish.
double run_parallel(int n, bool pin, const std::function<void(int)>& body) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> end(size_t(n), 0);
  Clock::time_point t0;
  std::vector<std::thread> pool;
  for (int i = 0; i < n; ++i) {
    pool.emplace_back([&, i] {
      if (pin) pin_to(i);
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      body(i);
      end[size_t(i)] = std::chrono::duration<double>(Clock::now() - t0).count();
    });
  }
  while (ready.load() < n) std::this_thread::yield();
  t0 = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : pool) t.join();
  return *std::max_element(end.begin(), end.end());
}

// ---------------------------------------------------------------- bandwidth
__attribute__((target("avx512f"))) uint64_t sum_avx512(const uint64_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {  // 512 bytes per iteration, eight independent adds
    // Prefetch 4 KiB ahead as the GEMV kernels do: without it the hardware
    // prefetcher alone leaves bandwidth unused and the roof reads low.
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 512), _MM_HINT_T0);
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 8));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 16));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 24));
    a4 = _mm512_add_epi64(a4, _mm512_load_si512(p + i + 32));
    a5 = _mm512_add_epi64(a5, _mm512_load_si512(p + i + 40));
    a6 = _mm512_add_epi64(a6, _mm512_load_si512(p + i + 48));
    a7 = _mm512_add_epi64(a7, _mm512_load_si512(p + i + 56));
  }
  a0 = _mm512_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)),
                        _mm512_add_epi64(_mm512_add_epi64(a4, a5), _mm512_add_epi64(a6, a7)));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, a0);
  uint64_t s = 0;
  for (uint64_t l : lanes) s += l;
  for (; i < n; ++i) s += p[i];
  return s;
}

uint64_t sum_baseline(const uint64_t* p, size_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3;
}

struct BandwidthResult {
  int threads;
  Summary gbs;
};

std::vector<BandwidthResult> probe_bandwidth(const Options& o, bool avx512, std::string* method) {
  const size_t bytes = o.size_mib << 20;
  const size_t n = bytes / sizeof(uint64_t);
  void* mem = std::aligned_alloc(2 << 20, bytes);
  if (!mem) {
    std::fprintf(stderr, "probes: cannot allocate %zu MiB\n", o.size_mib);
    std::exit(1);
  }
  madvise(mem, bytes, MADV_HUGEPAGE);  // as the library's weight arenas; fewer TLB misses
  auto* p = static_cast<uint64_t*>(mem);
  const int max_threads = *std::max_element(o.threads.begin(), o.threads.end());
  // First touch spread over the threads (one NUMA node here, but harmless).
  run_parallel(max_threads, o.pin, [&](int t) {
    const size_t b = n * size_t(t) / size_t(max_threads), e = n * size_t(t + 1) / size_t(max_threads);
    for (size_t i = b; i < e; ++i) p[i] = i;
  });
  *method = avx512 ? "avx512 loads, 8 accumulators" : "baseline loads, 4 accumulators";
  std::vector<BandwidthResult> out;
  std::atomic<uint64_t> sink{0};
  for (int th : o.threads) {
    std::vector<double> gbs;
    for (int r = 0; r < o.bw_repeats + 1; ++r) {  // the first repeat warms up and is dropped
      const size_t per_chunk = kReadChunk / sizeof(uint64_t), chunks = (n + per_chunk - 1) / per_chunk;
      std::atomic<size_t> next{0};
      const double s = run_parallel(th, o.pin, [&](int) {
        uint64_t local = 0;
        for (size_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
          const size_t b = c * per_chunk, len = std::min(per_chunk, n - b);
          local += avx512 ? sum_avx512(p + b, len) : sum_baseline(p + b, len);
        }
        sink += local;
      });
      if (r > 0) gbs.push_back(double(bytes) / s / 1e9);
    }
    out.push_back({th, summarize(gbs)});
    std::fprintf(stderr, "probes: read bandwidth %d thread(s): best %.1f GB/s, median %.1f GB/s\n", th, out.back().gbs.best,
                 out.back().gbs.median);
  }
  std::free(mem);
  if (sink.load() == 42) std::fprintf(stderr, " ");  // keeps the sums alive
  return out;
}

// ------------------------------------------------------------------ compute
// Each kernel runs `outer` x kInnerIters x kAccumulators instructions of its
// kind and returns something derived from every accumulator.
#define KT_ACC_LIST(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

__attribute__((target("avx512f,avx512vnni"))) int64_t vnni_kernel(int64_t outer, const int32_t* seed) {
  const __m512i a = _mm512_set1_epi32(seed[0]), b = _mm512_set1_epi32(seed[1]);
#define DECL(i) __m512i c##i = _mm512_set1_epi32(seed[2] + i);
  KT_ACC_LIST(DECL)
#undef DECL
  for (int64_t o = 0; o < outer; ++o) {
    for (int j = 0; j < kInnerIters; ++j) {
#define STEP(i) c##i = _mm512_dpbusd_epi32(c##i, a, b);
      KT_ACC_LIST(STEP)
#undef STEP
    }
    // An opaque barrier per outer step so the compiler cannot fold the chains.
#define OPAQUE(i) __asm__ volatile("" : "+v"(c##i));
    KT_ACC_LIST(OPAQUE)
#undef OPAQUE
  }
  __m512i s = _mm512_setzero_si512();
#define SUM(i) s = _mm512_add_epi32(s, c##i);
  KT_ACC_LIST(SUM)
#undef SUM
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, s);
  int64_t r = 0;
  for (int32_t l : lanes) r += l;
  return r;
}

__attribute__((target("avx512f,avx512bf16"))) int64_t bf16_kernel(int64_t outer, const int32_t* seed) {
  // bf16 pairs 0x3f80 (1.0) x tiny: accumulators grow slowly, never denormal or inf.
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x30003000 + (seed[0] & 1));
#define DECL(i) __m512 c##i = _mm512_set1_ps(float(seed[2] + i));
  KT_ACC_LIST(DECL)
#undef DECL
  for (int64_t o = 0; o < outer; ++o) {
    for (int j = 0; j < kInnerIters; ++j) {
#define STEP(i) c##i = _mm512_dpbf16_ps(c##i, a, b);
      KT_ACC_LIST(STEP)
#undef STEP
    }
#define OPAQUE(i) __asm__ volatile("" : "+v"(c##i));
    KT_ACC_LIST(OPAQUE)
#undef OPAQUE
  }
  __m512 s = _mm512_setzero_ps();
#define SUM(i) s = _mm512_add_ps(s, c##i);
  KT_ACC_LIST(SUM)
#undef SUM
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  double r = 0;
  for (float l : lanes) r += l;
  return int64_t(r);
}

__attribute__((target("avx512f"))) int64_t fma_kernel(int64_t outer, const int32_t* seed) {
  const __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-7f * float(1 + (seed[0] & 1)));
#define DECL(i) __m512 c##i = _mm512_set1_ps(float(seed[2] + i));
  KT_ACC_LIST(DECL)
#undef DECL
  for (int64_t o = 0; o < outer; ++o) {
    for (int j = 0; j < kInnerIters; ++j) {
#define STEP(i) c##i = _mm512_fmadd_ps(a, b, c##i);
      KT_ACC_LIST(STEP)
#undef STEP
    }
#define OPAQUE(i) __asm__ volatile("" : "+v"(c##i));
    KT_ACC_LIST(OPAQUE)
#undef OPAQUE
  }
  __m512 s = _mm512_setzero_ps();
#define SUM(i) s = _mm512_add_ps(s, c##i);
  KT_ACC_LIST(SUM)
#undef SUM
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  double r = 0;
  for (float l : lanes) r += l;
  return int64_t(r);
}

// A chain of dependent one-cycle integer adds: adds per second ~ core clock.
int64_t add_chain(int64_t outer) {
  uint64_t x = uint64_t(outer);
  for (int64_t o = 0; o < outer; ++o) {
    __asm__ volatile(
        ".rept 256\n\t"
        "add $1, %0\n\t"
        ".endr"
        : "+r"(x));
  }
  return int64_t(x);
}

using Kernel = int64_t (*)(int64_t, const int32_t*);

// Instructions per second of `k` on `threads` threads, best and median.
Summary probe_compute(const Options& o, Kernel k, int threads, double ops_per_inst, const char* name) {
  static const int32_t seed[3] = {0x01020304, 0x01010101, 1};
  std::atomic<int64_t> sink{0};
  // Calibrate: outer steps for ~compute_ms on one thread.
  int64_t outer = kComputeChunks;
  for (;;) {
    const auto t0 = Clock::now();
    sink += k(outer, seed);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (s > 0.02) {
      outer = std::max<int64_t>(kComputeChunks, int64_t(double(outer) * o.compute_ms / 1e3 / s));
      outer -= outer % kComputeChunks;
      break;
    }
    outer *= 4;
  }
  const double inst = double(outer) * kInnerIters * kAccumulators * threads;
  std::vector<double> rate;
  for (int r = 0; r < o.repeats; ++r) {
    const int64_t chunks = int64_t(threads) * kComputeChunks, per_chunk = outer / kComputeChunks;
    std::atomic<int64_t> next{0};
    const double s = run_parallel(threads, o.pin, [&](int) {
      while (next.fetch_add(1, std::memory_order_relaxed) < chunks) sink += k(per_chunk, seed);
    });
    rate.push_back(inst * ops_per_inst / s / 1e12);
  }
  const Summary sm = summarize(rate);
  std::fprintf(stderr, "probes: %s %d thread(s): best %.3f T/s, median %.3f T/s\n", name, threads, sm.best, sm.median);
  if (sink.load() == 42) std::fprintf(stderr, " ");
  return sm;
}

double probe_clock_ghz() {
  int64_t outer = 1 << 14;
  std::vector<double> ghz;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = Clock::now();
    volatile int64_t v = add_chain(outer);
    (void)v;
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (s < 0.05) {
      outer *= 4;
      --r;
      continue;
    }
    ghz.push_back(double(outer) * 256 / s / 1e9);
  }
  return summarize(ghz).best;
}

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    char* end = nullptr;
    const long x = std::strtol(p, &end, 10);
    if (end == p || x < 1) {
      std::fprintf(stderr, "probes: bad list '%s'\n", s);
      std::exit(2);
    }
    v.push_back(int(x));
    p = *end == ',' ? end + 1 : end;
  }
  return v;
}

std::string json_summary(const Summary& s, int digits) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "{\"best\": %.*f, \"median\": %.*f}", digits, s.best, digits, s.median);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const bool has = i + 1 < argc;
    if (!std::strcmp(argv[i], "--threads") && has) {
      o.threads = parse_list(argv[++i]);
    } else if (!std::strcmp(argv[i], "--size-mib") && has) {
      o.size_mib = size_t(std::max(1L, std::strtol(argv[++i], nullptr, 10)));
    } else if (!std::strcmp(argv[i], "--bw-repeats") && has) {
      o.bw_repeats = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--repeats") && has) {
      o.repeats = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--compute-ms") && has) {
      o.compute_ms = std::max(1.0, std::atof(argv[++i]));
    } else if (!std::strcmp(argv[i], "--pin")) {
      o.pin = true;
    } else {
      std::fprintf(stderr,
                   "usage: bench_probes [--threads 1,2] [--size-mib 1024] [--bw-repeats 20] [--repeats 7] "
                   "[--compute-ms 200] [--pin]\n");
      return 2;
    }
  }
  if (std::find(o.threads.begin(), o.threads.end(), 1) == o.threads.end()) o.threads.insert(o.threads.begin(), 1);
  std::sort(o.threads.begin(), o.threads.end());
  o.threads.erase(std::unique(o.threads.begin(), o.threads.end()), o.threads.end());

  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const bool has_vnni = has_avx512 && __builtin_cpu_supports("avx512vnni");
  const bool has_bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");

  std::string bw_method;
  const auto bw = probe_bandwidth(o, has_avx512, &bw_method);
  const double ghz = probe_clock_ghz();
  std::fprintf(stderr, "probes: clock estimate %.2f GHz\n", ghz);

  auto compute_json = [&](bool ok, Kernel k, double ops, const char* name) {
    std::string s = "{";
    for (size_t i = 0; i < o.threads.size(); ++i) {
      s += (i ? ", \"" : "\"") + std::to_string(o.threads[i]) + "\": ";
      s += ok ? json_summary(probe_compute(o, k, o.threads[i], ops, name), 4) : "null";
    }
    return s + "}";
  };
  const std::string vnni = compute_json(has_vnni, vnni_kernel, kVnniOpsPerInst, "vpdpbusd int8 TOP");
  const std::string bf16 = compute_json(has_bf16, bf16_kernel, kBf16OpsPerInst, "vdpbf16ps bf16 TFLOP");
  const std::string fma = compute_json(has_avx512, fma_kernel, kFmaOpsPerInst, "vfmadd231ps fp32 TFLOP");

  std::printf("{\n  \"cpu\": {\"avx512f\": %s, \"avx512vnni\": %s, \"avx512bf16\": %s, \"clock_ghz_estimate\": %.3f},\n",
              has_avx512 ? "true" : "false", has_vnni ? "true" : "false", has_bf16 ? "true" : "false", ghz);
  std::printf("  \"settings\": {\"size_mib\": %zu, \"bw_repeats\": %d, \"repeats\": %d, \"compute_ms\": %.0f, \"pin\": %s, "
              "\"accumulators\": %d, \"bandwidth_method\": \"%s\"},\n",
              o.size_mib, o.bw_repeats, o.repeats, o.compute_ms, o.pin ? "true" : "false", kAccumulators, bw_method.c_str());
  std::printf("  \"read_bandwidth_gbs\": {");
  for (size_t i = 0; i < bw.size(); ++i)
    std::printf("%s\"%d\": %s", i ? ", " : "", bw[i].threads, json_summary(bw[i].gbs, 2).c_str());
  std::printf("},\n");
  std::printf("  \"vnni_int8_tops\": %s,\n", vnni.c_str());
  std::printf("  \"bf16_tflops\": %s,\n", bf16.c_str());
  std::printf("  \"fp32_fma_tflops\": %s\n}\n", fma.c_str());
  return 0;
}
