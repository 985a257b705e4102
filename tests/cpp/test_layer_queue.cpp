// The ordered layer queue: FIFO on one executor thread, push never blocks,
// wait returns once the task ran, a task can be requeued after it finished.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "moe/layer_queue.h"

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
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& it : items) LayerQueue::instance().push(&it.task);
  const auto pushed = std::chrono::steady_clock::now();
  // Pushing 500 tasks (2 ms of sleeps among them) does not wait for them.
  EXPECT_LT(std::chrono::duration<double>(pushed - t0).count(), 0.002);
  LayerQueue::instance().wait(&items.back().task);
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

}  // namespace
}  // namespace kt
