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
#pragma once

#include <atomic>
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
  // The process-wide queue; its thread starts on the first push.
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

  ~LayerQueue();

 private:
  LayerQueue() = default;
  void run();
  void claim(QueuedTask* t);  // marks t busy; throws if it already was
  void enqueue_locked(QueuedTask* t);
  void finish(QueuedTask* t);  // marks t done, lets the next task run

  // How long the executor and waiters spin (yielding) before sleeping: a
  // few decode layers' worth (~100 us each), as layers follow each other.
  static constexpr int kSpinMicros = 200;

  std::atomic<int> queued_{0};  // tasks in the list, read while spinning
  std::mutex mutex_;
  std::condition_variable work_cv_;  // executor: a task was queued
  std::condition_variable done_cv_;  // waiters: a task finished
  QueuedTask* head_ = nullptr;
  QueuedTask* tail_ = nullptr;
  bool running_ = false;  // a task runs (on the executor or inline); under mutex_
  bool stop_ = false;
  bool started_ = false;
  std::thread thread_;
  std::atomic<std::thread::id> thread_id_{};
};

}  // namespace kt
