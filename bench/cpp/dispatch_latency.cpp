// Cost of one parallel_for with nothing to do: the fixed price every
// parallel step of a layer pays (publish, wake, join). A decode step runs a
// handful of such steps per layer, so this should stay at a few microseconds.
//
// Each sample times one job of num_threads empty tasks, issued back to back
// ("hot": workers still spinning), and, with fewer samples, after a pause
// longer than the spin budget ("cold": workers asleep on the condition
// variable, so the sample includes a futex wake-up).
//
//   bench_dispatch_latency [--threads N]... [--reps R] [--no-pin]
//
// By default the workers are pinned (as in production) and so is this
// thread, to the node's first core, where the pool leaves room for its
// caller; unpinned, the scheduler may keep a worker on the caller's CPU for
// a long time, and the samples then measure context switches. Prints a table
// and one JSON line.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "thread_pool.h"
#include "topology.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Stats {
  double median_us, p90_us, p99_us, min_us;
};

Stats summarize(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  auto at = [&](double q) { return us[std::min(us.size() - 1, size_t(q * double(us.size())))]; };
  return {at(0.5), at(0.9), at(0.99), us.front()};
}

std::vector<double> measure(kt::ThreadPool& pool, int reps, std::chrono::microseconds gap) {
  const size_t tasks = size_t(pool.num_threads());
  std::vector<double> us;
  us.reserve(size_t(reps));
  for (int i = 0; i < reps; ++i) {
    if (gap.count() > 0) std::this_thread::sleep_for(gap);
    const auto t0 = Clock::now();
    pool.parallel_for(tasks, [](size_t, int) {});
    const auto t1 = Clock::now();
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  return us;
}

}  // namespace

int run(int argc, char** argv) {
  std::vector<int> threads;
  int reps = 20000;
  bool pin = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) {
      threads.push_back(std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--no-pin")) {
      pin = false;
    } else {
      std::fprintf(stderr, "usage: %s [--threads N]... [--reps R] [--no-pin]\n", argv[0]);
      return 2;
    }
  }
  if (threads.empty()) threads = {1, 2};
  const kt::Topology& topo = kt::topology();
  const int node = topo.nodes.front().os_index;
  const bool caller_pinned = pin && kt::pin_current_thread(node, 0);
  const int cold_reps = std::max(1, std::min(reps / 20, 500));

  std::printf("dispatch latency of an empty parallel_for (tasks = threads), %d PUs, %d cores, pin=%d (caller %s)\n",
              topo.num_pus, topo.num_cores, int(pin), caller_pinned ? "pinned" : "unpinned");
  std::printf("%8s  %6s  %10s  %8s  %8s  %8s  %8s\n", "threads", "mode", "samples", "median", "p90", "p99",
              "min");
  std::string json = "{\"bench\":\"dispatch_latency\",\"unit\":\"us\",\"pin\":" + std::string(pin ? "true" : "false") +
                     ",\"results\":[";
  bool first = true;
  for (int n : threads) {
    if (n < 1) continue;
    kt::ThreadPool pool(n, {node}, pin);
    // Past the workers' spin (KT_KERNEL_SPIN_US, else 2 ms) by 1 ms.
    const auto cold_gap =
        std::chrono::duration_cast<std::chrono::microseconds>(pool.worker_spin()) + std::chrono::microseconds(1000);
    // Warm-up; also gives the scheduler time to move a new worker off the
    // caller's CPU.
    measure(pool, 10000, std::chrono::microseconds(0));
    struct Mode {
      const char* name;
      int reps;
      std::chrono::microseconds gap;
    };
    for (const Mode& m : {Mode{"hot", reps, std::chrono::microseconds(0)}, Mode{"cold", cold_reps, cold_gap}}) {
      const Stats s = summarize(measure(pool, m.reps, m.gap));
      std::printf("%8d  %6s  %10d  %8.2f  %8.2f  %8.2f  %8.2f\n", n, m.name, m.reps, s.median_us, s.p90_us, s.p99_us,
                  s.min_us);
      char buf[256];
      std::snprintf(buf, sizeof(buf),
                    "%s{\"threads\":%d,\"mode\":\"%s\",\"samples\":%d,\"median_us\":%.3f,\"p90_us\":%.3f,"
                    "\"p99_us\":%.3f,\"min_us\":%.3f}",
                    first ? "" : ",", n, m.name, m.reps, s.median_us, s.p90_us, s.p99_us, s.min_us);
      json += buf;
      first = false;
    }
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // a malformed KT_KERNEL_SPIN_US, a failed thread start
    std::fprintf(stderr, "bench_dispatch_latency: %s\n", e.what());
    return 2;
  }
}
