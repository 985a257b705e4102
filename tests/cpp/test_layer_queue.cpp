// The ordered layer queue: FIFO on one executor thread, push never blocks,
// wait returns once the task ran, a task can be requeued after it finished;
// run_or_push runs a task on the caller's thread only when the queue is idle,
// and never alongside another task.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "moe/layer_queue.h"
#include "test_support.h"

namespace kt {
namespace {

struct Recorder {
  std::vector<int> order;
  std::thread::id thread;
  bool same_thread = true;
};

struct Item {
  QueuedTask task;
  Recorder* rec = nullptr;
  int id = 0;
  int sleep_us = 0;
};

void run_item(void* arg) {
  Item& it = *static_cast<Item*>(arg);
  if (it.sleep_us) std::this_thread::sleep_for(std::chrono::microseconds(it.sleep_us));
  if (it.rec->order.empty())
    it.rec->thread = std::this_thread::get_id();
  else if (it.rec->thread != std::this_thread::get_id())
    it.rec->same_thread = false;
  it.rec->order.push_back(it.id);
}

TEST(LayerQueue, RunsTasksFirstInFirstOutOnOneThread) {
  Recorder rec;
  std::vector<Item> items(500);
  for (int i = 0; i < 500; ++i) {
    items[i].rec = &rec;
    items[i].id = i;
    items[i].sleep_us = i % 50 == 0 ? 200 : 0;
    items[i].task.fn = &run_item;
    items[i].task.arg = &items[i];
  }
  // Pushing does not wait for queued work: the first task holds the queue
  // until every push has returned (and gives up after 30 s, so a push that
  // waited fails the test rather than hanging it). No clock is asserted on.
  std::atomic<bool> all_pushed{false}, gave_up{false};
  struct Gate {
    QueuedTask task;
    std::atomic<bool>* open;
    std::atomic<bool>* gave_up;
  } gate{{}, &all_pushed, &gave_up};
  gate.task.fn = [](void* arg) {
    Gate& g = *static_cast<Gate*>(arg);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!g.open->load()) {
      if (std::chrono::steady_clock::now() > until) {
        g.gave_up->store(true);
        return;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  };
  gate.task.arg = &gate;
  LayerQueue::instance().push(&gate.task);
  for (auto& it : items) LayerQueue::instance().push(&it.task);
  all_pushed = true;
  LayerQueue::instance().wait(&items.back().task);
  EXPECT_FALSE(gave_up.load()) << "a push waited for queued work";
  for (auto& it : items) EXPECT_EQ(it.task.busy.load(), 0);
  ASSERT_EQ(rec.order.size(), 500u);
  for (int i = 0; i < 500; ++i) EXPECT_EQ(rec.order[i], i);
  EXPECT_TRUE(rec.same_thread);
  EXPECT_NE(rec.thread, std::this_thread::get_id());
}

TEST(LayerQueue, RequeueAfterWaitAndRejectRequeueWhileBusy) {
  Recorder rec;
  Item it;
  it.rec = &rec;
  it.sleep_us = 20000;
  it.task.fn = &run_item;
  it.task.arg = &it;
  LayerQueue::instance().push(&it.task);
  EXPECT_THROW(LayerQueue::instance().push(&it.task), std::logic_error);
  LayerQueue::instance().wait(&it.task);
  it.sleep_us = 0;
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
  std::thread::id ran_on;
};

void run_guarded(void* arg) {
  Guarded& g = *static_cast<Guarded*>(arg);
  const int now = g_active.fetch_add(1) + 1;
  int seen = g_max_active.load();
  while (now > seen && !g_max_active.compare_exchange_weak(seen, now)) {
  }
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
  Guarded slow, next;
  init_guarded(&slow, &order, 1, 20000);
  init_guarded(&next, &order, 2, 0);
  g_max_active = 0;
  LayerQueue::instance().push(&slow.task);
  // slow is queued or running for 20 ms: next must go behind it.
  EXPECT_FALSE(LayerQueue::instance().run_or_push(&next.task));
  LayerQueue::instance().wait(&next.task);
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
