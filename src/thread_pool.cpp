// ThreadPool implementation (contract in thread_pool.h).
//
// A job is published by bumping generation_; every worker takes part in
// every job: it sees the new generation, runs tasks from the per-queue
// counters until all are claimed, then decrements busy_workers_. The caller
// runs its own share as thread 0 and returns only when busy_workers_ is 0, so
// when parallel_for returns no worker still holds the job (which lives on the
// caller's stack) and the next job can be published at once.
//
// Waiting, on both sides, is a short spin (pause) followed by a sleep on a
// condition variable. Lost wake-ups are excluded by the Dekker pattern on
// sequentially consistent atomics: the sleeper announces itself (sleeping_,
// caller_sleeping_) before re-checking its condition under mutex_, and the
// waker changes the condition before reading the announcement and, if set,
// takes and releases mutex_ before notifying.
//
// Fork: see thread_pool.h. The registry of live pools and the list of
// ForkHandlers live in one never-destroyed object (a fork can happen while
// the process runs its static destructors); pthread_atfork is installed when
// it is made.
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>

#include "topology.h"

namespace kt {
namespace {

// How long a worker keeps spinning after a job before it sleeps, unless
// KT_KERNEL_SPIN_US says otherwise: long enough that the next layer call of
// a decode step, after the GPU's attention in between, still finds it awake;
// an idle pool stops burning CPU 2 ms after its last job. A woken worker
// takes ~30 us to run again in this VM (bench_dispatch_latency, "cold"),
// which a decode call pays inside its first parallel step: with 200 us-1 ms
// between calls, 2 ms instead of 80 us saved 20-28 us per 1-token call
// (bench/spin_gap.py: DeepSeek-V2-Lite INT4 561.6 -> 533.8 us, Qwen3-30B-A3B
// INT8 745.4 -> 719.6 us; 2 threads, alternated call by call).
constexpr std::chrono::nanoseconds kDefaultWorkerSpin{2'000'000};
constexpr const char* kSpinEnvVar = "KT_KERNEL_SPIN_US";
// How long the caller, its own share done, spins for the workers before it
// sleeps. Longer: tasks come from a shared counter, so the workers normally
// finish within one task of the caller, and a worker that had to be woken
// from sleep first may take 10-200 us to get a CPU back (more in a VM);
// sleeping then would add a second wake-up to the job.
constexpr std::chrono::nanoseconds kCallerSpinBudget{1'000'000};
// Pauses between two reads of the clock (a pause is 10-140 cycles).
constexpr int kPausesPerClockRead = 16;
// A spinning thread also yields the CPU this often: the scheduler likes to
// wake a sleeping worker on the waker's CPU, and without yields the worker,
// its share done, would spin its whole budget while the caller it waits for
// sits in the same run queue.
constexpr std::chrono::nanoseconds kYieldInterval{5'000};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Returns true as soon as done() holds, false if it still does not after
// `budget`. `always_yield`: yield instead of pausing (more threads than
// CPUs).
template <typename Pred>
bool spin_until(Pred done, bool always_yield, std::chrono::nanoseconds budget) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto last_yield = start;
  for (;;) {
    for (int i = 0; i < kPausesPerClockRead; ++i) {
      if (done()) return true;
      if (always_yield) std::this_thread::yield();
      else cpu_relax();
    }
    const auto now = Clock::now();
    if (now - start > budget) return done();
    if (now - last_yield > kYieldInterval) {
      std::this_thread::yield();
      last_yield = now;
    }
  }
}

// Set while the thread runs a task (and for the whole life of a worker):
// a parallel_for issued from there runs inline.
thread_local const ThreadPool* t_pool = nullptr;
thread_local int t_thread = 0;

// Marks the calling thread as running tasks of `pool` as `thread`; restores
// the previous marking on scope exit (including by exception).
class TaskScope {
 public:
  TaskScope(const ThreadPool* pool, int thread) : prev_pool_(t_pool), prev_thread_(t_thread) {
    t_pool = pool;
    t_thread = thread;
  }
  ~TaskScope() {
    t_pool = prev_pool_;
    t_thread = prev_thread_;
  }
  TaskScope(const TaskScope&) = delete;
  TaskScope& operator=(const TaskScope&) = delete;

 private:
  const ThreadPool* prev_pool_;
  int prev_thread_;
};

using FlatFn = FunctionRef<void(size_t, int)>;
using SubpoolFn = FunctionRef<void(int, size_t, int)>;

void invoke_flat(const void* fn, int /*queue*/, size_t task, int thread) {
  (*static_cast<const FlatFn*>(fn))(task, thread);
}

void invoke_subpool(const void* fn, int queue, size_t task, int thread) {
  (*static_cast<const SubpoolFn*>(fn))(queue, task, thread);
}

}  // namespace

// ------------------------------------------------------------------ fork
struct PoolRegistry {
  static constexpr int kMaxHandlers = 8;
  struct Entry {
    int order;
    ForkHandlers h;
  };
  std::mutex mutex;  // guards the fields below; held across fork() by the prepare handler
  ThreadPool* head = nullptr;
  Entry handlers[kMaxHandlers];
  int num_handlers = 0;  // sorted by order
  // The handlers one fork runs, copied in prepare (glibc runs the handlers
  // of concurrent forks one fork at a time).
  Entry forking[kMaxHandlers];
  int num_forking = 0;
  std::atomic<uint64_t> generation{0};

  static PoolRegistry& get() {
    static PoolRegistry* r = [] {
      auto* p = new PoolRegistry;
      if (int rc = pthread_atfork(&PoolRegistry::prepare, &PoolRegistry::parent, &PoolRegistry::child))
        throw std::system_error(rc, std::generic_category(), "kt_kernel: pthread_atfork");
      return p;
    }();
    return *r;
  }

  void add(ThreadPool* p) {
    std::lock_guard<std::mutex> lock(mutex);
    p->registry_prev_ = nullptr;
    p->registry_next_ = head;
    if (head) head->registry_prev_ = p;
    head = p;
  }
  void remove(ThreadPool* p) {
    std::lock_guard<std::mutex> lock(mutex);
    if (p->registry_prev_) p->registry_prev_->registry_next_ = p->registry_next_;
    else head = p->registry_next_;
    if (p->registry_next_) p->registry_next_->registry_prev_ = p->registry_prev_;
    p->registry_prev_ = p->registry_next_ = nullptr;
  }

  static void prepare() {
    PoolRegistry& r = get();
    {
      std::lock_guard<std::mutex> lock(r.mutex);
      r.num_forking = r.num_handlers;
      std::copy(r.handlers, r.handlers + r.num_handlers, r.forking);
    }
    // Outside the registry lock: they wait for work that may make or drop
    // a pool.
    for (int i = 0; i < r.num_forking; ++i)
      if (r.forking[i].h.prepare) r.forking[i].h.prepare();
    r.mutex.lock();  // no pool is made or destroyed across the fork
    for (ThreadPool* p = r.head; p; p = p->registry_next_) p->before_fork();
  }
  static void parent() {
    PoolRegistry& r = get();
    for (ThreadPool* p = r.head; p; p = p->registry_next_) p->after_fork_in_parent();
    r.mutex.unlock();
    for (int i = r.num_forking - 1; i >= 0; --i)
      if (r.forking[i].h.parent) r.forking[i].h.parent();
  }
  static void child() {
    PoolRegistry& r = get();
    for (ThreadPool* p = r.head; p; p = p->registry_next_) p->after_fork_in_child();
    new (&r.mutex) std::mutex();  // locked by prepare; this process has no one else to unlock it
    r.generation.fetch_add(1);
    for (int i = r.num_forking - 1; i >= 0; --i)
      if (r.forking[i].h.child) r.forking[i].h.child();
  }
};

void add_fork_handlers(int order, const ForkHandlers& h) {
  PoolRegistry& r = PoolRegistry::get();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (int i = 0; i < r.num_handlers; ++i) {
    const ForkHandlers& e = r.handlers[i].h;
    if (e.prepare == h.prepare && e.parent == h.parent && e.child == h.child) return;
  }
  if (r.num_handlers == PoolRegistry::kMaxHandlers) throw std::length_error("kt_kernel: too many fork handlers");
  int i = r.num_handlers++;
  for (; i > 0 && r.handlers[i - 1].order > order; --i) r.handlers[i] = r.handlers[i - 1];
  r.handlers[i] = PoolRegistry::Entry{order, h};
}

uint64_t fork_generation() { return PoolRegistry::get().generation.load(); }

void ThreadPool::before_fork() {
  // A task of this pool calling fork() holds (thread 0) or is part of a job
  // under dispatch_mutex_: waiting for it would never end. Its child is not
  // supported (the job's other tasks are lost with the workers).
  fork_skipped_dispatch_ = t_pool == this;
  if (!fork_skipped_dispatch_) dispatch_mutex_.lock();  // waits for a job in flight
  mutex_.lock();  // no worker is inside a sleep or wake-up
}

void ThreadPool::after_fork_in_parent() {
  mutex_.unlock();
  if (!fork_skipped_dispatch_) dispatch_mutex_.unlock();
}

void ThreadPool::after_fork_in_child() {
  // The workers are not in this process: drop their handles untouched (a
  // join would wait forever, and glibc may reuse their thread descriptors
  // for threads made here). The next job starts new ones.
  workers_.clear();  // pthread_t: frees nothing, allocates nothing
  live_workers_.store(0);
  // Locked by before_fork, and the condition variables may count waiters
  // that do not exist here: fresh ones (constructing them allocates nothing).
  new (&mutex_) std::mutex();
  new (&dispatch_mutex_) std::mutex();
  new (&wake_) std::condition_variable();
  new (&done_) std::condition_variable();
  job_.store(nullptr);
  busy_workers_.store(0);
  sleeping_.store(0);
  caller_sleeping_.store(false);
  stop_ = false;
}

// One parallel_for call. Queue q has counts[q] tasks, claimed through
// counters_[q]; parallel_for uses one queue shared by all threads,
// parallel_for_subpools one queue per sub-pool.
struct ThreadPool::Job {
  int num_queues;
  const size_t* counts;
  const void* fn;  // the caller's FunctionRef
  void (*invoke)(const void* fn, int queue, size_t task, int thread);
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // written once, by the thread that set `failed`
};

std::chrono::nanoseconds ThreadPool::worker_spin_from_env() {
  const char* v = std::getenv(kSpinEnvVar);
  if (!v || !*v) return kDefaultWorkerSpin;
  // Digits only (no sign, space or suffix), at most an hour: anything else
  // is a typo, refused rather than read as something else.
  unsigned long long us = 0;
  bool ok = std::strlen(v) <= 10;
  for (const char* c = v; ok && *c; ++c) {
    ok = *c >= '0' && *c <= '9';
    us = us * 10 + unsigned(*c - '0');
  }
  if (!ok || us > 3'600'000'000ULL)
    throw std::invalid_argument(std::string(kSpinEnvVar) + "=" + v +
                                ": expected microseconds, a whole number from 0 to 3600000000");
  return std::chrono::microseconds(us);
}

ThreadPool::ThreadPool(int num_threads, const std::vector<int>& subpool_numa_nodes, bool pin,
                       std::chrono::nanoseconds worker_spin)
    : num_threads_(num_threads), pin_(pin), subpool_nodes_(subpool_numa_nodes), worker_spin_ns_(worker_spin.count()) {
  if (num_threads_ < 1) throw std::invalid_argument("ThreadPool: num_threads must be >= 1");
  if (subpool_nodes_.empty()) subpool_nodes_.push_back(topology().nodes.front().os_index);
  const size_t n = size_t(num_threads_);
  const size_t num_sub = subpool_nodes_.size();
  thread_subpool_.assign(n, 0);
  for (size_t t = 0; t < n; ++t) thread_subpool_[t] = int(t);  // n < num_sub: one thread each
  if (n >= num_sub) {
    for (size_t s = 0; s < num_sub; ++s)
      for (size_t t = s * n / num_sub; t < (s + 1) * n / num_sub; ++t) thread_subpool_[t] = int(s);
  }
  counters_ = std::vector<TaskCounter>(num_sub);
  // Unpinned workers inherit the caller's affinity (taskset, a launcher);
  // pinned ones may use every CPU of their node.
  int cpus = topology().num_pus;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (!pin && sched_getaffinity(0, sizeof(allowed), &allowed) == 0) cpus = std::max(1, CPU_COUNT(&allowed));
  oversubscribed_ = num_threads_ > cpus;

  workers_.reserve(n - 1);  // never reallocated: a forked child refills it in place
  // Registered before the workers start, under dispatch_mutex_: a fork
  // meanwhile waits, and its child sees a pool with no workers.
  PoolRegistry::get().add(this);
  try {
    std::lock_guard<std::mutex> dispatch(dispatch_mutex_);
    start_workers();
  } catch (...) {
    PoolRegistry::get().remove(this);
    stop_workers();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  PoolRegistry::get().remove(this);  // waits for a fork in progress
  stop_workers();
}

struct ThreadPool::WorkerStart {
  ThreadPool* pool;
  int thread;
  uint64_t seen;  // the generation when it was started: the next one is its first job
};

void* ThreadPool::worker_entry(void* arg) {
  std::unique_ptr<WorkerStart> s(static_cast<WorkerStart*>(arg));
  s->pool->worker_main(s->thread, s->seen);
  return nullptr;
}

void ThreadPool::start_workers() {
  const uint64_t seen = generation_.load();  // no job in flight: the caller holds dispatch_mutex_
  for (int t = int(workers_.size()) + 1; t < num_threads_; ++t) {
    auto start = std::make_unique<WorkerStart>(WorkerStart{this, t, seen});
    pthread_t h;
    if (int rc = pthread_create(&h, nullptr, &ThreadPool::worker_entry, start.get()))
      throw std::system_error(rc, std::generic_category(), "kt_kernel: cannot start worker thread " + std::to_string(t));
    start.release();  // the worker owns it now
    workers_.push_back(h);  // within the reserved capacity
    live_workers_.store(int(workers_.size()));
  }
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    job_.store(nullptr);
    generation_.fetch_add(1);
    wake_.notify_all();
  }
  for (pthread_t w : workers_) pthread_join(w, nullptr);
  workers_.clear();
  live_workers_.store(0);
}

void ThreadPool::worker_main(int thread, uint64_t seen) {
  TaskScope scope(this, thread);
  char name[16];
  std::snprintf(name, sizeof(name), "kt-worker-%d", thread);
  pthread_setname_np(pthread_self(), name);
  if (pin_) {
    const size_t n = size_t(num_threads_);
    const size_t num_sub = subpool_nodes_.size();
    const int s = thread_subpool_[size_t(thread)];
    const int first = n >= num_sub ? int(size_t(s) * n / num_sub) : s;
    pin_current_thread(subpool_nodes_[size_t(s)], thread - first);  // unknown node: stays unpinned
  }

  for (;;) {
    seen = wait_for_next_job(seen);
    Job* job = job_.load(std::memory_order_acquire);
    if (job == nullptr) return;  // stop_workers()
    do_job_share(job, thread);
    // After this decrement the job may be gone; only pool members are touched.
    if (busy_workers_.fetch_sub(1) == 1) {
      if (caller_sleeping_.load()) {
        { std::lock_guard<std::mutex> lock(mutex_); }  // the caller is now waiting, or will see 0
        done_.notify_one();
      } else if (sched_getcpu() == caller_cpu_.load(std::memory_order_relaxed)) {
        // The caller spins in this CPU's run queue (the scheduler tends to
        // put a worker next to the thread that created or woke it): let it
        // run now rather than after a spin interval.
        std::this_thread::yield();
      }
    }
  }
}

uint64_t ThreadPool::wait_for_next_job(uint64_t seen) {
  auto published = [&] { return generation_.load(std::memory_order_acquire) != seen; };
  while (!spin_until(published, oversubscribed_, worker_spin())) {
    sleeping_.fetch_add(1);
    // Read after announcing the sleep: a wake() that saw this sleeper bumps
    // the epoch after this load, and the predicate below sees it.
    const uint64_t epoch = wake_epoch_.load();
    bool job_or_stop;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_.load() != seen || wake_epoch_.load() != epoch; });
      job_or_stop = stop_ || generation_.load() != seen;
    }
    sleeping_.fetch_sub(1);
    if (job_or_stop) break;
    early_wakeups_.fetch_add(1, std::memory_order_relaxed);  // woken by wake(): spin again
  }
  // Exactly seen + 1: the caller waits for every worker before it can
  // publish again.
  return generation_.load(std::memory_order_acquire);
}

void ThreadPool::wake() {
  if (sleeping_.load() == 0) return;
  wake_epoch_.fetch_add(1);
  { std::lock_guard<std::mutex> lock(mutex_); }  // a sleeper between its check and its wait gets the notification
  wake_.notify_all();
}

void ThreadPool::wait_for_workers() {
  auto finished = [&] { return busy_workers_.load(std::memory_order_acquire) == 0; };
  if (spin_until(finished, oversubscribed_, kCallerSpinBudget)) return;
  caller_sleeping_.store(true);
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return busy_workers_.load() == 0; });
  }
  caller_sleeping_.store(false);
}

void ThreadPool::do_job_share(Job* job, int thread) {
  const int nq = job->num_queues;
  const int first = nq == 1 ? 0 : thread_subpool_[size_t(thread)];
  for (int k = 0; k < nq; ++k) {
    const int q = first + k < nq ? first + k : first + k - nq;  // own queue, then the others
    std::atomic<size_t>& next = counters_[size_t(q)].next;
    const size_t count = job->counts[q];
    for (;;) {
      if (job->failed.load(std::memory_order_relaxed)) return;
      if (next.load(std::memory_order_relaxed) >= count) break;
      const size_t task = next.fetch_add(1, std::memory_order_relaxed);
      if (task >= count) break;
      try {
        job->invoke(job->fn, q, task, thread);
      } catch (...) {
        if (!job->failed.exchange(true)) job->error = std::current_exception();
        return;
      }
    }
  }
}

void ThreadPool::run_job(Job* job) {
  size_t total = 0;
  for (int q = 0; q < job->num_queues; ++q) total += job->counts[q];
  if (total == 0) return;
  if (t_pool != nullptr || num_threads_ == 1 || total == 1) {
    // Nested, single-threaded, or not worth waking anyone: serially, here,
    // still marked as a task so that calls from it run inline too. The first
    // exception propagates and skips the remaining tasks.
    const int thread = t_pool == this ? t_thread : 0;
    TaskScope scope(this, thread);
    for (int q = 0; q < job->num_queues; ++q)
      for (size_t task = 0; task < job->counts[q]; ++task) job->invoke(job->fn, q, task, thread);
    return;
  }

  std::lock_guard<std::mutex> dispatch(dispatch_mutex_);
  // A forked child's first job (or one after a failed start): workers come
  // back here. Throws, publishing nothing, if the system refuses a thread.
  if (int(workers_.size()) != num_threads_ - 1) start_workers();
  for (int q = 0; q < job->num_queues; ++q) counters_[size_t(q)].next.store(0, std::memory_order_relaxed);
  job_.store(job, std::memory_order_relaxed);
  busy_workers_.store(num_threads_ - 1, std::memory_order_relaxed);
  caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
  generation_.fetch_add(1);  // publishes the stores above
  if (sleeping_.load() > 0) {
    // Notified outside the lock, so that a woken worker does not block on
    // mutex_ straight away; taking it first means any worker that checked
    // the old generation under it is now waiting and gets the notification.
    { std::lock_guard<std::mutex> lock(mutex_); }
    wake_.notify_all();
  }
  {
    TaskScope scope(this, 0);
    do_job_share(job, 0);
  }
  wait_for_workers();
  if (job->error) std::rethrow_exception(job->error);
}

void ThreadPool::parallel_for(size_t num_tasks, FunctionRef<void(size_t task, int thread)> fn) {
  if (num_tasks == 0) return;
  Job job;
  job.num_queues = 1;
  job.counts = &num_tasks;
  job.fn = &fn;
  job.invoke = invoke_flat;
  run_job(&job);
}

void ThreadPool::parallel_for_subpools(const size_t* counts,
                                       FunctionRef<void(int subpool, size_t task, int thread)> fn) {
  Job job;
  job.num_queues = num_subpools();
  job.counts = counts;
  job.fn = &fn;
  job.invoke = invoke_subpool;
  run_job(&job);
}

}  // namespace kt
