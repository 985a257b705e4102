#include "moe/layer_queue.h"

#include <chrono>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>

#include "thread_pool.h"

namespace kt {
namespace {

// Set while this thread runs a task (executor or inline): fork's wait for an
// idle queue must not wait for the caller's own task.
thread_local bool t_in_task = false;

class InTask {
 public:
  InTask() { t_in_task = true; }
  ~InTask() { t_in_task = false; }
  InTask(const InTask&) = delete;
  InTask& operator=(const InTask&) = delete;
};

// Its prepare runs before the pools quiesce: queued tasks need the pools.
constexpr int kForkOrderQueue = 1;

}  // namespace

LayerQueue& LayerQueue::instance() {
  static LayerQueue* q = [] {
    auto* p = new LayerQueue;  // never destroyed (see layer_queue.h)
    ForkHandlers h;
    h.prepare = [] { instance().before_fork(); };
    h.parent = [] { instance().after_fork_in_parent(); };
    h.child = [] { instance().after_fork_in_child(); };
    add_fork_handlers(kForkOrderQueue, h);
    return p;
  }();
  return *q;
}

void LayerQueue::before_fork() {
  std::unique_lock<std::mutex> lock(mutex_);
  // Tasks never wait for the thread calling fork (which, from Python, holds
  // the GIL): they all finish.
  if (!t_in_task) done_cv_.wait(lock, [&] { return !running_ && head_ == nullptr; });
  lock.release();  // held across fork: nothing is queued or started meanwhile
}

void LayerQueue::after_fork_in_parent() { mutex_.unlock(); }

void LayerQueue::after_fork_in_child() {
  // The executor is not in this process: forget it (never join it); the
  // next push starts one. Fresh locks: this one was held by before_fork, and
  // the condition variables may count waiters that are not here.
  new (&mutex_) std::mutex();
  new (&work_cv_) std::condition_variable();
  new (&done_cv_) std::condition_variable();
  started_ = false;
  thread_ = pthread_t{};
  thread_id_.store(std::thread::id());
}

bool LayerQueue::executor_started() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return started_;
}

bool LayerQueue::wait_idle(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  return done_cv_.wait_until(lock, deadline, [&] { return !running_ && head_ == nullptr; });
}

void LayerQueue::push(QueuedTask* t) {
  claim(t);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    try {
      enqueue_locked(t);
    } catch (...) {
      t->busy.store(0, std::memory_order_release);  // not queued: a wait on it must not block
      throw;
    }
  }
  work_cv_.notify_one();
}

void LayerQueue::claim(QueuedTask* t) {
  if (t->busy.exchange(1, std::memory_order_acq_rel))
    throw std::logic_error("kt_kernel: a layer task was queued again before it finished");
}

void* LayerQueue::executor_entry(void* queue) {
  static_cast<LayerQueue*>(queue)->run();
  return nullptr;
}

void LayerQueue::start_executor_locked() {
  pthread_t h;
  if (int rc = pthread_create(&h, nullptr, &LayerQueue::executor_entry, this))
    throw std::system_error(rc, std::generic_category(), "kt_kernel: cannot start the layer queue thread");
  thread_ = h;
  started_ = true;
}

void LayerQueue::enqueue_locked(QueuedTask* t) {
  t->next = nullptr;
  if (!started_) start_executor_locked();
  if (tail_)
    tail_->next = t;
  else
    head_ = t;
  tail_ = t;
  queued_.fetch_add(1, std::memory_order_release);
}

bool LayerQueue::run_or_push(QueuedTask* t) {
  claim(t);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (head_ || running_ || on_executor()) {
      try {
        enqueue_locked(t);
      } catch (...) {
        t->busy.store(0, std::memory_order_release);
        throw;
      }
      t = nullptr;
    } else {
      running_ = true;
    }
  }
  if (!t) {
    work_cv_.notify_one();
    return false;
  }
  {
    InTask in_task;
    t->fn(t->arg);
  }
  finish(t);
  return true;
}

void LayerQueue::finish(QueuedTask* t) {
  {
    // Under the mutex, so a waiter between its check and its sleep cannot
    // miss the notification.
    std::lock_guard<std::mutex> lock(mutex_);
    t->busy.store(0, std::memory_order_release);
    running_ = false;
  }
  done_cv_.notify_all();
  work_cv_.notify_one();  // tasks queued while an inline task ran
}

void LayerQueue::wait(QueuedTask* t) {
  if (!t->busy.load(std::memory_order_acquire)) return;
  if (on_executor()) throw std::logic_error("kt_kernel: a layer task waited on a task queued after it");
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  while (std::chrono::steady_clock::now() < spin_until) {
    if (!t->busy.load(std::memory_order_acquire)) return;
    std::this_thread::yield();
  }
  std::unique_lock<std::mutex> lock(mutex_);
  done_cv_.wait(lock, [&] { return !t->busy.load(std::memory_order_acquire); });
}

void LayerQueue::run() {
  thread_id_.store(std::this_thread::get_id());
  for (;;) {
    // Spin a little before sleeping: the next layer's task usually follows
    // within microseconds, and waking a sleeping thread costs tens of them.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    while (!queued_.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < spin_until)
      std::this_thread::yield();
    QueuedTask* t;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_cv_.wait(lock, [&] { return !running_ && head_ != nullptr; });
      t = head_;
      queued_.fetch_sub(1, std::memory_order_relaxed);
      head_ = t->next;
      if (!head_) tail_ = nullptr;
      running_ = true;
    }
    {
      InTask in_task;
      t->fn(t->arg);
    }
    finish(t);
  }
}

}  // namespace kt
