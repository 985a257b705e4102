// The thread pool's contract under contention: every task runs exactly once,
// jobs follow one another without lost wake-ups, exceptions reach the caller
// and leave the pool usable, sub-pools run their own tasks with the right
// index, nested calls do not deadlock. Pools with more threads than CPUs are
// included on purpose (they exercise the sleep/wake paths). No assertion
// depends on timing.
#include <gtest/gtest.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_support.h"
#include "thread_pool.h"
#include "topology.h"

namespace kt {
namespace {

int first_node() { return topology().nodes.front().os_index; }

// hits[i] counts runs of task i; bad counts out-of-range thread ids.
struct HitCounter {
  explicit HitCounter(size_t n) : hits(n) {}
  std::vector<std::atomic<int>> hits;
  std::atomic<int> bad_thread{0};

  void expect_each_once(const std::string& what) const {
    size_t wrong = 0, first_wrong = 0;
    for (size_t i = 0; i < hits.size(); ++i) {
      if (hits[i].load() != 1 && wrong++ == 0) first_wrong = i;
    }
    EXPECT_EQ(wrong, 0u) << what << ": first wrong task " << first_wrong << " ran "
                         << (wrong ? hits[first_wrong].load() : 1) << " times";
    EXPECT_EQ(bad_thread.load(), 0) << what;
  }
};

TEST(Topology, DescribesAtLeastOneNodeWithCpus) {
  const Topology& t = topology();
  ASSERT_FALSE(t.nodes.empty());
  EXPECT_GE(t.num_pus, 1);
  EXPECT_GE(t.num_cores, 1);
  EXPECT_LE(t.num_cores, t.num_pus);
  size_t total_cpus = 0;
  for (size_t i = 0; i < t.nodes.size(); ++i) {
    const NumaNodeInfo& n = t.nodes[i];
    EXPECT_GE(n.os_index, 0);
    if (i > 0) {
      EXPECT_LT(t.nodes[i - 1].os_index, n.os_index);
    }
    EXPECT_TRUE(std::is_sorted(n.cpus.begin(), n.cpus.end()));
    total_cpus += n.cpus.size();
  }
  EXPECT_GE(total_cpus, 1u);
  EXPECT_EQ(&topology(), &t);  // discovered once
}

TEST(Topology, PinUnknownNodeFails) {
  EXPECT_FALSE(pin_current_thread(1 << 20, 0));
  EXPECT_FALSE(pin_current_thread(-1, 0));
}

TEST(Topology, PinnedThreadRunsOnItsNode) {
  // On a separate thread, so the test runner's own affinity is untouched.
  const NumaNodeInfo& node = topology().nodes.front();
  for (int slot : {0, 1, 7, -3}) {
    bool pinned = false;
    int cpu = -1;
    std::thread th([&] {
      pinned = pin_current_thread(node.os_index, slot);
      cpu = sched_getcpu();
    });
    th.join();
    if (!pinned) continue;  // a sandbox may forbid changing affinity
    EXPECT_TRUE(std::find(node.cpus.begin(), node.cpus.end(), cpu) != node.cpus.end())
        << "slot " << slot << " ran on cpu " << cpu;
  }
}

TEST(ThreadPool, RejectsZeroThreads) {
  EXPECT_THROW(ThreadPool(0, {first_node()}, false), std::invalid_argument);
}

TEST(ThreadPool, EachTaskRunsExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads, {first_node()}, false);
    EXPECT_EQ(pool.num_threads(), threads);
    for (size_t n : {size_t(0), size_t(1), size_t(2), size_t(7), size_t(1000), size_t(100000)}) {
      HitCounter c(n);
      pool.parallel_for(n, [&](size_t task, int thread) {
        c.hits[task].fetch_add(1, std::memory_order_relaxed);
        if (thread < 0 || thread >= threads) c.bad_thread.fetch_add(1);
      });
      c.expect_each_once("threads=" + std::to_string(threads) + " tasks=" + std::to_string(n));
    }
  }
}

TEST(ThreadPool, ZeroTaskJobsRunNothing) {
  ThreadPool pool(3, {first_node(), first_node()}, false);
  std::atomic<int> ran{0};
  for (int i = 0; i < 100; ++i) {
    pool.parallel_for(0, [&](size_t, int) { ran.fetch_add(1); });
    const size_t counts[2] = {0, 0};
    pool.parallel_for_subpools(counts, [&](int, size_t, int) { ran.fetch_add(1); });
  }
  EXPECT_EQ(ran.load(), 0);
}

TEST(ThreadPool, BackToBackJobs) {
  // Plain (non-atomic) writes by the tasks must be visible to the caller as
  // soon as parallel_for returns, and no job may lose or repeat a task.
  for (int threads : {2, 3, 8}) {
    ThreadPool pool(threads, {first_node()}, false);
    const int jobs = threads > 4 ? 1500 : 5000;
    std::vector<int> out(16);
    long mismatches = 0;
    for (int j = 0; j < jobs; ++j) {
      const size_t n = size_t(j % 17);  // includes 0 and 1 (inline paths)
      pool.parallel_for(n, [&](size_t task, int) { out[task] = j; });
      for (size_t i = 0; i < n; ++i) mismatches += out[i] != j;
    }
    EXPECT_EQ(mismatches, 0) << "threads=" << threads;
  }
}

TEST(ThreadPool, JobsAfterWorkersFellAsleep) {
  // Gaps around the spin budget (80 us here), so that publishing races with
  // workers going to sleep (and the caller's own wait races with its sleep).
  ThreadPool pool(3, {first_node()}, false, std::chrono::microseconds(80));
  for (int gap_us : {0, 20, 60, 80, 100, 150, 300, 1000, 3000}) {
    for (int rep = 0; rep < 4; ++rep) {
      std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
      HitCounter c(64);
      pool.parallel_for(64, [&](size_t task, int thread) {
        if (task % 16 == 0) std::this_thread::sleep_for(std::chrono::microseconds(gap_us / 4));
        c.hits[task].fetch_add(1);
        if (thread < 0 || thread >= 3) c.bad_thread.fetch_add(1);
      });
      c.expect_each_once("gap_us=" + std::to_string(gap_us));
    }
  }
}

// Polls cond until it holds. The test asserts on states, not on how fast
// they are reached: the bound only turns a state never reached into a
// failure instead of a hang, so it is far beyond what a loaded machine or a
// sanitizer build needs.
template <class Cond>
bool eventually(Cond cond) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < until) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return cond();
}

TEST(ThreadPool, WakeGetsSleepersSpinningAndTheyFallAsleepAgain) {
  ThreadPool pool(3, {first_node()}, false, std::chrono::microseconds(80));
  pool.parallel_for(3, [](size_t, int) {});  // workers started and past their first job
  ASSERT_TRUE(eventually([&] { return pool.sleeping_workers() == 2; }));
  const uint64_t before = pool.early_wakeups();
  pool.wake();
  // Both leave their sleep (to spin), then, with no job coming, sleep again.
  EXPECT_TRUE(eventually([&] { return pool.early_wakeups() == before + 2; }));
  EXPECT_TRUE(eventually([&] { return pool.sleeping_workers() == 2; }));
  // Woken, then a job: every task still runs exactly once; wake() with
  // nobody asleep is a no-op.
  for (int rep = 0; rep < 50; ++rep) {
    pool.wake();
    if (rep % 10 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
    HitCounter c(32);
    pool.parallel_for(32, [&](size_t task, int thread) {
      c.hits[task].fetch_add(1);
      if (thread < 0 || thread >= 3) c.bad_thread.fetch_add(1);
    });
    c.expect_each_once("after wake, rep " + std::to_string(rep));
  }
}

// KT_KERNEL_SPIN_US sets how long workers spin; anything but a whole number
// of microseconds is refused with the variable's name, never misread.
TEST(ThreadPool, SpinBudgetFromTheEnvironment) {
  const char* name = "KT_KERNEL_SPIN_US";
  const char* saved = std::getenv(name);
  const std::string restore = saved ? saved : "";
  unsetenv(name);
  EXPECT_EQ(ThreadPool::worker_spin_from_env(), std::chrono::milliseconds(2));
  setenv(name, "150", 1);
  EXPECT_EQ(ThreadPool::worker_spin_from_env(), std::chrono::microseconds(150));
  {
    ThreadPool pool(2, {first_node()}, false);
    EXPECT_EQ(pool.worker_spin(), std::chrono::microseconds(150));
  }
  setenv(name, "0", 1);  // sleep at once: jobs still run
  {
    ThreadPool pool(2, {first_node()}, false);
    HitCounter c(64);
    for (int rep = 0; rep < 20; ++rep) pool.parallel_for(64, [&](size_t task, int) { c.hits[task].fetch_add(1); });
    for (size_t t = 0; t < 64; ++t) EXPECT_EQ(c.hits[t].load(), 20) << t;
  }
  for (const char* bad : {"abc", "-1", "12x", " 5", "99999999999999999999", "3600000001"}) {
    setenv(name, bad, 1);
    try {
      ThreadPool::worker_spin_from_env();
      ADD_FAILURE() << "accepted " << bad;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
    EXPECT_THROW(ThreadPool(2, {first_node()}, false), std::invalid_argument) << bad;
  }
  if (saved)
    setenv(name, restore.c_str(), 1);
  else
    unsetenv(name);
}

TEST(ThreadPool, ExceptionReachesCallerAndPoolStaysUsable) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads, {first_node()}, false);
    for (size_t thrower : {size_t(0), size_t(1), size_t(500), size_t(999)}) {
      HitCounter c(1000);
      try {
        pool.parallel_for(1000, [&](size_t task, int) {
          c.hits[task].fetch_add(1);
          if (task == thrower) throw std::runtime_error("task " + std::to_string(task));
        });
        ADD_FAILURE() << "no exception, threads=" << threads;
      } catch (const std::runtime_error& e) {
        EXPECT_EQ(std::string(e.what()), "task " + std::to_string(thrower));
      }
      EXPECT_EQ(c.hits[thrower].load(), 1);
      for (size_t i = 0; i < c.hits.size(); ++i) ASSERT_LE(c.hits[i].load(), 1) << "task " << i;

      HitCounter after(1000);
      pool.parallel_for(1000, [&](size_t task, int) { after.hits[task].fetch_add(1); });
      after.expect_each_once("after exception, threads=" + std::to_string(threads));
    }

    // Every task throws: exactly one exception comes out.
    for (int rep = 0; rep < 50; ++rep) {
      EXPECT_THROW(pool.parallel_for(64, [&](size_t, int) { throw std::logic_error("all"); }), std::logic_error);
    }
    HitCounter after(100);
    pool.parallel_for(100, [&](size_t task, int) { after.hits[task].fetch_add(1); });
    after.expect_each_once("after all-throw, threads=" + std::to_string(threads));
  }
}

TEST(ThreadPool, SubpoolsRunEachTaskOnceWithTheirIndex) {
  // Two sub-pools on the same node stand in for two NUMA nodes.
  const int node = first_node();
  for (int threads : {1, 2, 3, 4, 8}) {
    for (bool pin : {false, true}) {
      ThreadPool pool(threads, {node, node}, pin);
      ASSERT_EQ(pool.num_subpools(), 2);
      for (int t = 0; t < threads; ++t) {
        // [0, n/2), [n/2, n); one thread: sub-pool 0 (the caller's).
        const int expect = threads > 1 && t >= threads / 2 ? 1 : 0;
        EXPECT_EQ(pool.subpool_of_thread(t), expect) << "threads=" << threads << " t=" << t;
      }
      const size_t shapes[][2] = {{0, 0}, {1, 0}, {0, 1}, {1, 1}, {7, 0}, {0, 7}, {5, 1000}, {1000, 3}, {20000, 20000}};
      for (const auto& counts : shapes) {
        HitCounter a(counts[0]), b(counts[1]);
        std::atomic<int> bad_subpool{0};
        pool.parallel_for_subpools(counts, [&](int s, size_t task, int thread) {
          if (s == 0 && task < counts[0]) a.hits[task].fetch_add(1);
          else if (s == 1 && task < counts[1]) b.hits[task].fetch_add(1);
          else bad_subpool.fetch_add(1);
          if (thread < 0 || thread >= threads) a.bad_thread.fetch_add(1);
        });
        const std::string what = "threads=" + std::to_string(threads) + " counts=" + std::to_string(counts[0]) +
                                 "," + std::to_string(counts[1]);
        a.expect_each_once(what + " subpool 0");
        b.expect_each_once(what + " subpool 1");
        EXPECT_EQ(bad_subpool.load(), 0) << what;
      }
    }
  }
}

TEST(ThreadPool, MoreSubpoolsThanThreads) {
  // Sub-pools without a thread of their own are drained by the others.
  const int node = first_node();
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads, {node, node, node, node}, false);
    for (int t = 0; t < threads; ++t) EXPECT_EQ(pool.subpool_of_thread(t), t);
    const size_t counts[4] = {3, 100, 0, 1000};
    std::vector<std::unique_ptr<HitCounter>> c;
    for (size_t n : counts) c.push_back(std::make_unique<HitCounter>(n));
    pool.parallel_for_subpools(counts, [&](int s, size_t task, int thread) {
      c[size_t(s)]->hits[task].fetch_add(1);
      if (thread < 0 || thread >= threads) c[size_t(s)]->bad_thread.fetch_add(1);
    });
    for (int s = 0; s < 4; ++s) c[size_t(s)]->expect_each_once("threads=" + std::to_string(threads) + " subpool " + std::to_string(s));
  }
}

TEST(ThreadPool, SubpoolExceptionReachesCaller) {
  const int node = first_node();
  ThreadPool pool(4, {node, node}, false);
  const size_t counts[2] = {300, 300};
  HitCounter a(300), b(300);
  EXPECT_THROW(pool.parallel_for_subpools(counts,
                                          [&](int s, size_t task, int) {
                                            (s == 0 ? a : b).hits[task].fetch_add(1);
                                            if (s == 1 && task == 150) throw std::runtime_error("sub");
                                          }),
               std::runtime_error);
  for (size_t i = 0; i < 300; ++i) {
    ASSERT_LE(a.hits[i].load(), 1);
    ASSERT_LE(b.hits[i].load(), 1);
  }
  HitCounter c(600);
  pool.parallel_for_subpools(counts, [&](int s, size_t task, int) { c.hits[size_t(s) * 300 + task].fetch_add(1); });
  c.expect_each_once("after subpool exception");
}

TEST(ThreadPool, NestedCallsRunInlineWithoutDeadlock) {
  const int node = first_node();
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads, {node, node}, false);
    ThreadPool other(2, {node}, false);
    HitCounter c(64 * 9);
    std::atomic<int> wrong_thread{0};
    pool.parallel_for(64, [&](size_t outer, int outer_thread) {
      c.hits[outer * 9].fetch_add(1);
      pool.parallel_for(4, [&](size_t inner, int thread) {
        c.hits[outer * 9 + 1 + inner].fetch_add(1);
        if (thread != outer_thread) wrong_thread.fetch_add(1);
      });
      const size_t counts[2] = {2, 1};
      pool.parallel_for_subpools(counts, [&](int s, size_t task, int thread) {
        c.hits[outer * 9 + 5 + size_t(s) * 2 + task].fetch_add(1);
        if (thread != outer_thread) wrong_thread.fetch_add(1);
      });
      other.parallel_for(1, [&](size_t, int) { c.hits[outer * 9 + 8].fetch_add(1); });
    });
    c.expect_each_once("nested, threads=" + std::to_string(threads));
    EXPECT_EQ(wrong_thread.load(), 0);
  }
}

TEST(ThreadPool, NestedExceptionPropagates) {
  ThreadPool pool(3, {first_node()}, false);
  EXPECT_THROW(pool.parallel_for(10,
                                 [&](size_t outer, int) {
                                   pool.parallel_for(10, [&](size_t inner, int) {
                                     if (outer == 3 && inner == 4) throw std::out_of_range("nested");
                                   });
                                 }),
               std::out_of_range);
  HitCounter c(100);
  pool.parallel_for(100, [&](size_t task, int) { c.hits[task].fetch_add(1); });
  c.expect_each_once("after nested exception");
}

TEST(ThreadPool, CallersOnDifferentThreadsAreSerialised) {
  ThreadPool pool(3, {first_node()}, false);
  constexpr int kCallers = 3, kJobs = 300;
  std::vector<std::unique_ptr<HitCounter>> counters;
  for (int i = 0; i < kCallers; ++i) counters.push_back(std::make_unique<HitCounter>(size_t(kJobs) * 8));
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i) {
    callers.emplace_back([&, i] {
      for (int j = 0; j < kJobs; ++j)
        pool.parallel_for(8, [&](size_t task, int) { counters[size_t(i)]->hits[size_t(j) * 8 + task].fetch_add(1); });
    });
  }
  for (auto& t : callers) t.join();
  for (int i = 0; i < kCallers; ++i) counters[size_t(i)]->expect_each_once("caller " + std::to_string(i));
}

TEST(ThreadPool, CreateAndDestroyRepeatedly) {
  for (int i = 0; i < 100; ++i) {
    ThreadPool pool(1 + i % 4, {first_node()}, i % 2 == 0);
    if (i % 3 == 0) continue;  // destroyed without ever running a job
    std::atomic<int> ran{0};
    pool.parallel_for(size_t(i), [&](size_t, int) { ran.fetch_add(1); });
    EXPECT_EQ(ran.load(), i);
  }
}

// Fork: the child has none of the parent's workers; it must neither wait for
// them nor join them, and its first job starts its own.
TEST(ThreadPool, ForkedChildRunsJobsOnItsOwnWorkers) {
  if (!test::kForkTestsSupported) GTEST_SKIP() << "ThreadSanitizer does not start threads after a multi-threaded fork";
  auto pool = std::make_unique<ThreadPool>(3, std::vector<int>{first_node()}, false);
  std::atomic<int> sum{0};
  pool->parallel_for(64, [&](size_t t, int) { sum += int(t); });
  ASSERT_EQ(sum.load(), 63 * 64 / 2);
  const uint64_t gen = fork_generation();
  const int code = test::run_in_forked_child([&] {
    if (pool->live_workers() != 0 || fork_generation() != gen + 1) return false;
    HitCounter hits(257);
    pool->parallel_for(hits.hits.size(), [&](size_t t, int th) {
      hits.hits[t]++;
      if (th < 0 || th >= 3) hits.bad_thread++;
    });
    for (auto& h : hits.hits)
      if (h.load() != 1) return false;
    if (hits.bad_thread.load() || pool->live_workers() != 2) return false;
    ThreadPool fresh(2, {first_node()}, false);  // made and destroyed in the child
    fresh.parallel_for(8, [](size_t, int) {});
    pool.reset();  // joins the child's own workers only
    return true;
  });
  EXPECT_EQ(code, 0);
  ASSERT_TRUE(pool);
  EXPECT_EQ(pool->live_workers(), 2);
  sum = 0;
  pool->parallel_for(64, [&](size_t t, int) { sum += int(t); });
  EXPECT_EQ(sum.load(), 63 * 64 / 2);
  // A child that never uses the pool destroys it without waiting for anyone.
  EXPECT_EQ(test::run_in_forked_child([&] {
              pool.reset();
              return true;
            }),
            0);
}

TEST(ThreadPool, ForkWaitsForAJobInFlightOnAnotherThread) {
  if (!test::kForkTestsSupported) GTEST_SKIP() << "ThreadSanitizer does not start threads after a multi-threaded fork";
  ThreadPool pool(2, {first_node()}, false);
  std::atomic<bool> started{false};
  std::atomic<int> ran{0};
  std::thread caller([&] {
    pool.parallel_for(40, [&](size_t, int) {
      started = true;
      std::this_thread::sleep_for(std::chrono::microseconds(500));
      ++ran;
    });
  });
  while (!started.load()) std::this_thread::yield();
  // Forks while the job runs (or just after): the fork waits for it, so the
  // child's pool has no job half done and no lock held.
  const int code = test::run_in_forked_child([&] {
    std::atomic<int> n{0};
    pool.parallel_for(16, [&](size_t, int) { ++n; });
    return n.load() == 16 && ran.load() == 40;
  });
  caller.join();
  EXPECT_EQ(code, 0);
  EXPECT_EQ(ran.load(), 40);
}

}  // namespace
}  // namespace kt
