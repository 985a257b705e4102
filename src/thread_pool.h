// The worker pool every parallel step of the library runs on.
//
// Contract (after ruy's thread_pool.h): the calling thread participates as
// thread 0; work is a count of tasks handed out by an atomic counter, so
// faster threads take more; a job returns when every task has run exactly
// once; the first exception thrown by a task is rethrown in the caller (the
// remaining tasks of that job are skipped). Threads are grouped in sub-pools,
// one per NUMA node; that is the only topology feature. No OpenMP: the host
// process (PyTorch) runs its own.
//
// Workers spin after a job (dispatch of the next job then costs a few
// microseconds), 2 ms unless the environment variable KT_KERNEL_SPIN_US
// (microseconds, read when the pool is made) says otherwise, then sleep on a
// condition variable so an idle pool burns no CPU.
//
// Fork safety: a forked child has only the thread that called fork(), so
// every pool's workers are gone there. A process-wide pthread_atfork handler
// (installed once, with the first pool or ForkHandlers) quiesces the pools before fork (waits for a
// job in flight, holds their locks across it, so the child never sees a lock
// held or a job half done by a thread it lacks); the child forgets the
// workers it does not have (never joins or signals them), gets fresh locks,
// and starts new workers on its first job. Other process-wide threads and
// locks (the layer queue, the bindings' call count) hook into the same
// handler through add_fork_handlers, so the order is fixed: theirs quiesce
// first, since the work they wait for needs the pools.
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace kt {

// A non-owning reference to a callable, cheaper than std::function (no
// allocation, one indirect call per task).
template <typename Signature>
class FunctionRef;

template <typename R, typename... Args>
class FunctionRef<R(Args...)> {
 public:
  template <typename F>
  FunctionRef(F&& f)  // NOLINT: implicit by design, like std::function
      : obj_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* o, Args... a) -> R { return (*static_cast<std::remove_reference_t<F>*>(o))(a...); }) {}
  R operator()(Args... a) const { return call_(obj_, a...); }

 private:
  void* obj_;
  R (*call_)(void*, Args...);
};

// Handlers run around fork() with the pools' own (pthread_atfork, one
// process-wide registration). `order`: prepare handlers run by increasing
// order, then the pools quiesce; after fork the pools are reset first, then
// parent/child handlers run by decreasing order. A handler's prepare may wait
// for work that needs handlers of a higher order or the pools, never the
// reverse. The bindings' count of calls in progress uses 0, the layer queue
// 1. At most 8 registrations; the same set twice is registered once. Child
// handlers run in a process with one thread and must not allocate.
struct ForkHandlers {
  void (*prepare)() = nullptr;
  void (*parent)() = nullptr;
  void (*child)() = nullptr;
};
void add_fork_handlers(int order, const ForkHandlers& h);

// Fork generations seen by this process: 0 until a fork, then +1 in each
// child (tests).
uint64_t fork_generation();

class ThreadPool {
 public:
  // KT_KERNEL_SPIN_US, or the default (2 ms); throws std::invalid_argument
  // naming the variable when it is not a whole number of microseconds.
  static std::chrono::nanoseconds worker_spin_from_env();

  // num_threads: total threads including the caller (>= 1).
  // subpool_numa_nodes: NUMA node (OS index) of each sub-pool; threads are
  // spread evenly over sub-pools (sub-pool s gets threads
  // [s*n/S, (s+1)*n/S); with fewer threads than sub-pools, thread t is in
  // sub-pool t). The caller is thread 0 of sub-pool 0. Workers are
  // pinned to the CPUs of their node when `pin` is true and the node exists.
  // worker_spin: how long workers spin after a job before they sleep.
  ThreadPool(int num_threads, const std::vector<int>& subpool_numa_nodes, bool pin,
             std::chrono::nanoseconds worker_spin = worker_spin_from_env());
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }
  // How long workers spin after a job before they sleep; settable at any
  // time (a worker reads it as it finishes each job).
  std::chrono::nanoseconds worker_spin() const { return std::chrono::nanoseconds(worker_spin_ns_.load()); }
  void set_worker_spin(std::chrono::nanoseconds d) { worker_spin_ns_.store(d.count()); }
  int num_subpools() const { return int(subpool_nodes_.size()); }
  int subpool_of_thread(int thread) const { return thread_subpool_[size_t(thread)]; }
  const std::vector<int>& subpool_numa_nodes() const { return subpool_nodes_; }

  // Runs fn(task, thread) for every task in [0, num_tasks). Blocks.
  // Zero tasks return at once; one task, a one-thread pool, or a call made
  // from inside a task (nested, any pool) run inline and serially on the
  // calling thread (a nested call passes the caller's own thread index when
  // it is this pool's thread, else 0). Calls from different threads are
  // serialised.
  void parallel_for(size_t num_tasks, FunctionRef<void(size_t task, int thread)> fn);

  // Gets sleeping workers back to spinning, for a caller that will publish a
  // job shortly, after some serial work of its own (a layer call: argument
  // checks, input copies, routing); the wake-up, ~25 us in a VM, then
  // overlaps that work instead of delaying the job. Cheap when none sleeps.
  void wake();
  // For tests: workers asleep now; sleeps ended by wake() so far.
  int sleeping_workers() const { return sleeping_.load(); }
  uint64_t early_wakeups() const { return early_wakeups_.load(); }
  // Worker threads running in this process (after a fork: 0 in the child
  // until its first job starts new ones).
  int live_workers() const { return live_workers_.load(); }

  // Sub-pool s has counts[s] tasks of its own (counts: num_subpools()
  // entries, read during the call). Each thread runs its own sub-pool's
  // tasks first, then helps the others. fn(subpool, task, thread). Same
  // inline cases as parallel_for.
  void parallel_for_subpools(const size_t* counts, FunctionRef<void(int subpool, size_t task, int thread)> fn);

 private:
  struct Job;
  struct alignas(64) TaskCounter {
    std::atomic<size_t> next{0};
  };
  struct WorkerStart;
  static void* worker_entry(void* start);
  void worker_main(int thread, uint64_t seen);
  void start_workers();  // the missing ones; under dispatch_mutex_ or in the constructor
  void run_job(Job* job);
  void do_job_share(Job* job, int thread);
  uint64_t wait_for_next_job(uint64_t seen);
  void wait_for_workers();
  void stop_workers();
  // pthread_atfork stages (thread_pool.cpp), for every live pool.
  void before_fork();
  void after_fork_in_parent();
  void after_fork_in_child();
  friend struct PoolRegistry;

  int num_threads_;
  bool pin_;
  std::vector<int> subpool_nodes_;
  std::atomic<int64_t> worker_spin_ns_;
  std::vector<int> thread_subpool_;
  // Raw handles rather than std::thread: after a fork the child drops the
  // handles of workers it does not have without touching them (a
  // std::thread could only be joined, detached or abort).
  std::vector<pthread_t> workers_;
  std::atomic<int> live_workers_{0};
  bool fork_skipped_dispatch_ = false;  // before_fork ran on a thread inside this pool's job
  ThreadPool* registry_prev_ = nullptr;  // live pools, for the fork handler
  ThreadPool* registry_next_ = nullptr;

  std::vector<TaskCounter> counters_;  // one per sub-pool, reset per job

  std::mutex dispatch_mutex_;  // serialises jobs from different callers
  std::mutex mutex_;           // guards sleeping and waking (wake_, done_, stop_)
  std::condition_variable wake_;  // workers: a new generation was published
  std::condition_variable done_;  // caller: busy_workers_ reached 0
  // Written by the caller when it publishes a job, read by spinning workers.
  alignas(64) std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> wake_epoch_{0};  // bumped by wake(): sleepers go back to spinning
  std::atomic<uint64_t> early_wakeups_{0};
  std::atomic<Job*> job_{nullptr};
  std::atomic<int> sleeping_{0};
  std::atomic<int> caller_cpu_{-1};  // CPU the caller published the job from
  // Written by workers as they finish, read by the spinning caller.
  alignas(64) std::atomic<int> busy_workers_{0};
  std::atomic<bool> caller_sleeping_{false};
  bool stop_ = false;
  // More threads than CPUs: waiting threads yield instead of pausing, so a
  // spinning thread does not hold the CPU another thread needs.
  bool oversubscribed_ = false;
};

}  // namespace kt
