#include "moe/layer_queue.h"

#include <chrono>
#include <stdexcept>

namespace kt {

LayerQueue& LayerQueue::instance() {
  static LayerQueue q;
  return q;
}

LayerQueue::~LayerQueue() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void LayerQueue::push(QueuedTask* t) {
  claim(t);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    enqueue_locked(t);
  }
  work_cv_.notify_one();
}

void LayerQueue::claim(QueuedTask* t) {
  if (t->busy.exchange(1, std::memory_order_acq_rel))
    throw std::logic_error("kt_kernel: a layer task was queued again before it finished");
}

void LayerQueue::enqueue_locked(QueuedTask* t) {
  t->next = nullptr;
  if (!started_) {
    started_ = true;
    thread_ = std::thread([this] { run(); });
  }
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
      enqueue_locked(t);
      t = nullptr;
    } else {
      running_ = true;
    }
  }
  if (!t) {
    work_cv_.notify_one();
    return false;
  }
  t->fn(t->arg);
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
      work_cv_.wait(lock, [&] { return !running_ && (stop_ || head_ != nullptr); });
      if (!head_) return;  // stop requested and nothing left
      t = head_;
      queued_.fetch_sub(1, std::memory_order_relaxed);
      head_ = t->next;
      if (!head_) tail_ = nullptr;
      running_ = true;
    }
    t->fn(t->arg);
    finish(t);
  }
}

}  // namespace kt
