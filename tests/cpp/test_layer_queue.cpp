// The ordered layer queue: FIFO on one executor thread, push never blocks,
// wait returns once the task ran, a task can be requeued after it finished;
// run_or_push runs a task on the caller's thread only when the queue is idle,
// and never alongside another task. No assertion depends on timing: where a
// test needs the queue busy, a task holds the executor at a gate until the
// test opens it.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

#include "moe/layer_queue.h"
#include "test_support.h"

namespace kt {
namespace {

// Holds the task that calls hold() until the test calls open(). The wait is
// bounded only so that a queue that wrongly waits for its tasks (push
// blocking until the held task ran) fails the test instead of hanging it:
// the hold then ends by itself, passed() turns true before the test's check,
// and timed_out() says why. Its length is not a property under test.
class Gate {
 public:
  void hold() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return open_; })) timed_out_ = true;
    passed_.store(true);
  }
  void open() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = true;
    }
    cv_.notify_all();
  }
  bool passed() const { return passed_.load(); }
  bool timed_out() {
    std::lock_guard<std::mutex> lock(mutex_);
    return timed_out_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
  bool timed_out_ = false;
  std::atomic<bool> passed_{false};
};

struct Recorder {
  std::vector<int> order;
  std::thread::id thread;
  bool same_thread = true;
  std::atomic<int> ran{0};  // read by the test while tasks may run
};

struct Item {
  QueuedTask task;
  Recorder* rec = nullptr;
  int id = 0;
  Gate* gate = nullptr;  // held here before the task records itself
  int sleep_us = 0;      // keeps the queue busy a while (the fork test: work still running at the fork)
};

void run_item(void* arg) {
  Item& it = *static_cast<Item*>(arg);
  if (it.gate) it.gate->hold();
  if (it.sleep_us) std::this_thread::sleep_for(std::chrono::microseconds(it.sleep_us));
  if (it.rec->order.empty())
    it.rec->thread = std::this_thread::get_id();
  else if (it.rec->thread != std::this_thread::get_id())
    it.rec->same_thread = false;
  it.rec->order.push_back(it.id);
  it.rec->ran.fetch_add(1);
}

TEST(LayerQueue, RunsTasksFirstInFirstOutOnOneThread) {
  Recorder rec;
  Gate gate;
  std::vector<Item> items(500);
  for (int i = 0; i < 500; ++i) {
    items[i].rec = &rec;
    items[i].id = i;
    items[i].task.fn = &run_item;
    items[i].task.arg = &items[i];
  }
  items[0].gate = &gate;
  for (auto& it : items) LayerQueue::instance().push(&it.task);
  // Every push returned while the first task was still held: push does not
  // wait for queued or running work, and nothing behind the first task ran.
  EXPECT_FALSE(gate.passed());
  EXPECT_EQ(rec.ran.load(), 0);
  for (auto& it : items) EXPECT_EQ(it.task.busy.load(), 1);
  gate.open();
  LayerQueue::instance().wait(&items.back().task);
  EXPECT_FALSE(gate.timed_out());
  for (auto& it : items) EXPECT_EQ(it.task.busy.load(), 0);
  ASSERT_EQ(rec.order.size(), 500u);
  for (int i = 0; i < 500; ++i) EXPECT_EQ(rec.order[i], i);
  EXPECT_TRUE(rec.same_thread);
  EXPECT_NE(rec.thread, std::this_thread::get_id());
}

TEST(LayerQueue, RequeueAfterWaitAndRejectRequeueWhileBusy) {
  Recorder rec;
  Gate gate;
  Item it;
  it.rec = &rec;
  it.gate = &gate;
  it.task.fn = &run_item;
  it.task.arg = &it;
  LayerQueue::instance().push(&it.task);
  // Held at the gate, so certainly still busy.
  EXPECT_THROW(LayerQueue::instance().push(&it.task), std::logic_error);
  gate.open();
  LayerQueue::instance().wait(&it.task);
  EXPECT_FALSE(gate.timed_out());
  it.gate = nullptr;
  for (int i = 0; i < 100; ++i) {
    it.id = i;
    LayerQueue::instance().push(&it.task);
    LayerQueue::instance().wait(&it.task);
  }
  ASSERT_EQ(rec.order.size(), 101u);
  EXPECT_EQ(rec.order.back(), 99);
}

// Counts tasks running at once, across the executor and inline callers.
std::atomic<int> g_active{0};
std::atomic<int> g_max_active{0};

struct Guarded {
  QueuedTask task;
  std::vector<int>* order = nullptr;
  int id = 0;
  int sleep_us = 0;
  Gate* gate = nullptr;  // held here before the task runs
  std::thread::id ran_on;
};

void run_guarded(void* arg) {
  Guarded& g = *static_cast<Guarded*>(arg);
  const int now = g_active.fetch_add(1) + 1;
  int seen = g_max_active.load();
  while (now > seen && !g_max_active.compare_exchange_weak(seen, now)) {
  }
  if (g.gate) g.gate->hold();
  if (g.sleep_us) std::this_thread::sleep_for(std::chrono::microseconds(g.sleep_us));
  g.ran_on = std::this_thread::get_id();
  if (g.order) g.order->push_back(g.id);
  g_active.fetch_sub(1);
}

void init_guarded(Guarded* g, std::vector<int>* order, int id, int sleep_us) {
  g->order = order;
  g->id = id;
  g->sleep_us = sleep_us;
  g->task.fn = &run_guarded;
  g->task.arg = g;
}

TEST(LayerQueue, RunOrPushRunsOnTheCallerWhenIdle) {
  std::vector<int> order;
  Guarded g;
  init_guarded(&g, &order, 1, 0);
  // Earlier tests waited for their tasks, so the queue is idle.
  EXPECT_TRUE(LayerQueue::instance().run_or_push(&g.task));
  EXPECT_EQ(g.ran_on, std::this_thread::get_id());
  EXPECT_EQ(g.task.busy.load(), 0);
  EXPECT_EQ(order, std::vector<int>{1});
  LayerQueue::instance().wait(&g.task);  // returns at once
}

TEST(LayerQueue, RunOrPushQueuesBehindRunningWork) {
  std::vector<int> order;
  Gate gate;
  Guarded slow, next;
  init_guarded(&slow, &order, 1, 0);
  init_guarded(&next, &order, 2, 0);
  slow.gate = &gate;
  g_max_active = 0;
  LayerQueue::instance().push(&slow.task);
  // slow is queued or held at the gate: next must go behind it.
  EXPECT_FALSE(LayerQueue::instance().run_or_push(&next.task));
  EXPECT_FALSE(gate.passed());
  gate.open();
  LayerQueue::instance().wait(&next.task);
  EXPECT_FALSE(gate.timed_out());
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  EXPECT_NE(next.ran_on, std::this_thread::get_id());
  EXPECT_EQ(g_max_active.load(), 1);
}

TEST(LayerQueue, InlineAndQueuedTasksNeverOverlap) {
  // One thread runs its tasks through run_or_push (waiting for each), another
  // pushes a stream of tasks; no two tasks ever run at once, and each thread's
  // tasks run in its order.
  constexpr int kN = 200;
  std::vector<int> inline_order, queued_order;
  std::vector<Guarded> a(kN), b(kN);
  for (int i = 0; i < kN; ++i) {
    init_guarded(&a[i], &inline_order, i, i % 7 == 0 ? 50 : 0);
    init_guarded(&b[i], &queued_order, i, i % 5 == 0 ? 50 : 0);
  }
  g_max_active = 0;
  int ran_inline = 0;
  std::thread caller([&] {
    for (auto& g : a) {
      if (LayerQueue::instance().run_or_push(&g.task)) ++ran_inline;
      LayerQueue::instance().wait(&g.task);
    }
  });
  for (auto& g : b) {
    LayerQueue::instance().push(&g.task);
    if (&g - b.data() == kN / 2) LayerQueue::instance().wait(&g.task);  // let the queue drain once
  }
  caller.join();
  LayerQueue::instance().wait(&b.back().task);
  EXPECT_EQ(g_max_active.load(), 1);
  ASSERT_EQ(inline_order.size(), size_t(kN));
  ASSERT_EQ(queued_order.size(), size_t(kN));
  for (int i = 0; i < kN; ++i) {
    EXPECT_EQ(inline_order[i], i);
    EXPECT_EQ(queued_order[i], i);
  }
  // Whether each ran inline or queued is up to timing; the count is for the log.
  std::printf("run_or_push ran %d of %d tasks inline\n", ran_inline, kN);
}

// Fork: the executor is not in the child; the child's first push starts its
// own, and tasks queued in the parent before the fork ran before it (fork
// waits for an idle queue).
TEST(LayerQueue, ForkedChildStartsItsOwnExecutor) {
  if (!test::kForkTestsSupported) GTEST_SKIP() << "ThreadSanitizer does not start threads after a multi-threaded fork";
  Recorder rec;
  std::vector<Item> items(6);
  for (int i = 0; i < 6; ++i) {
    items[i].task.fn = &run_item;
    items[i].task.arg = &items[i];
    items[i].rec = &rec;
    items[i].id = i;
    items[i].sleep_us = 300;
  }
  for (auto& it : items) LayerQueue::instance().push(&it.task);  // still running at the fork
  const int code = test::run_in_forked_child([&] {
    if (rec.order.size() != 6 || LayerQueue::instance().executor_started()) return false;
    Recorder child_rec;
    Item again;
    again.task.fn = &run_item;
    again.task.arg = &again;
    again.rec = &child_rec;
    again.id = 7;
    LayerQueue::instance().push(&again.task);
    LayerQueue::instance().wait(&again.task);
    return child_rec.order == std::vector<int>{7} && LayerQueue::instance().executor_started() &&
           LayerQueue::instance().wait_idle(std::chrono::steady_clock::now() + std::chrono::seconds(5));
  });
  EXPECT_EQ(code, 0);
  LayerQueue::instance().wait(&items.back().task);
  EXPECT_EQ(rec.order, (std::vector<int>{0, 1, 2, 3, 4, 5}));
  EXPECT_TRUE(LayerQueue::instance().executor_started());
}

}  // namespace
}  // namespace kt
