// The one ordered queue of layer tasks (DESIGN.md "Threads and async").
//
// A single process-wide executor thread runs queued tasks first in, first
// out, as the worker pool's caller thread, so layer tasks never overlap and
// their order is the order they were queued. Queuing returns at once: this is
// what lets submit_forward return before the CPU work runs, and what expert
// deferral relies on (a layer's deferred task is queued before the next
// layer's main task, so it has finished when that task runs). A caller that
// would wait at once (forward = submit + sync) may instead run its task
// itself through run_or_push, which does so only when nothing is queued or
// running, so the order and the no-overlap rule are the same.
//
// Tasks are intrusive, owned by the caller and reused: pushing allocates
// nothing, so the path a CUDA graph replays (a host function that pushes)
// is allocation-free.
//
// The queue is never destroyed, and its thread is not joined at exit: a
// static destructor joining it would run whatever is still queued while the
// other statics those tasks use are being destroyed (and, in a forked child,
// wait for a thread that is not there). Code that exits with work queued
// waits for it first (wait_idle; the Python module does so at interpreter
// exit). Across fork() (ForkHandlers in thread_pool.h): fork waits until the
// queue is idle and holds its lock, so the child starts with an empty queue;
// the child's first push starts its own executor. Forking from inside a layer
// task is not supported.
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace kt {

struct QueuedTask {
  void (*fn)(void* arg) = nullptr;  // must not throw (catch and record inside)
  void* arg = nullptr;
  // 0 idle/done, 1 queued or running. Written by the queue.
  std::atomic<int> busy{0};
  QueuedTask* next = nullptr;  // queue link, owned by the queue while busy
};

class LayerQueue {
 public:
  // The process-wide queue; its thread starts on the first push (the first
  // after a fork, in the child).
  static LayerQueue& instance();

  // Queues t (which must not be busy). Never blocks on running work.
  void push(QueuedTask* t);
  // Runs t on the calling thread, now, if no task is queued or running (as
  // the executor would have: nothing overlaps it, tasks queued meanwhile
  // wait for it); otherwise queues it like push. Returns true if it ran.
  // For a caller that would wait for t at once anyway (forward = submit +
  // sync): it saves the two thread hand-offs, ~20-50 us per call, the cost
  // of a whole decode layer's worth of memory traffic on small experts.
  bool run_or_push(QueuedTask* t);
  // Blocks until t is not busy (returns at once for an idle task). Spins a
  // few microseconds first: decode layers take ~100 us.
  void wait(QueuedTask* t);
  // True on the executor thread (a task must never wait on a later task).
  bool on_executor() const { return std::this_thread::get_id() == thread_id_.load(); }
  // Blocks until no task is queued or running, or until `deadline`; true if
  // idle. A task pushed meanwhile is waited for too.
  bool wait_idle(std::chrono::steady_clock::time_point deadline);
  // True while the executor thread exists in this process (tests).
  bool executor_started() const;

 private:
  LayerQueue() = default;
  ~LayerQueue() = default;  // never runs (see the top of this file)
  static void* executor_entry(void* queue);
  void run();
  void start_executor_locked();
  void before_fork();
  void after_fork_in_parent();
  void after_fork_in_child();
  void claim(QueuedTask* t);  // marks t busy; throws if it already was
  void enqueue_locked(QueuedTask* t);
  void finish(QueuedTask* t);  // marks t done, lets the next task run

  // How long the executor and waiters spin (yielding) before sleeping: a
  // few decode layers' worth (~100 us each), as layers follow each other.
  static constexpr int kSpinMicros = 200;

  std::atomic<int> queued_{0};  // tasks in the list, read while spinning
  mutable std::mutex mutex_;
  std::condition_variable work_cv_;  // executor: a task was queued
  std::condition_variable done_cv_;  // waiters: a task finished
  QueuedTask* head_ = nullptr;
  QueuedTask* tail_ = nullptr;
  bool running_ = false;  // a task runs (on the executor or inline); under mutex_
  bool started_ = false;  // under mutex_
  pthread_t thread_{};    // raw: a forked child drops it untouched
  std::atomic<std::thread::id> thread_id_{};
};

}  // namespace kt
