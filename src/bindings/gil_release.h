// GIL release for the bindings (use GilRelease, never py::gil_scoped_release),
// safe at interpreter exit and across fork().
//
// Exit: while the interpreter finalizes, a daemon thread that asks for the
// GIL back is ended by CPython with pthread_exit. From a C++ destructor (the
// one that takes the GIL back) that unwinding aborts the process ("terminate
// called without an active exception"). So kt_kernel registers an atexit
// function (atexit runs before finalization starts) that calls
// prepare_for_exit: from then on a thread other than the exiting one that
// enters or leaves a GIL-released section parks forever instead of taking the
// GIL back (the process ends around it), and prepare_for_exit waits, with a
// bound, until every thread that was inside such a section has parked or is
// back in Python, and the layer queue is idle: nothing of ours runs while
// the interpreter frees the objects it uses.
//
// Fork: a call in progress on another thread may hold any of the library's
// locks (the staging lock, the scratch arena, a pool's dispatch). The fork
// handler waits, with a bound, until no thread is inside a GIL-released
// section. The thread calling os.fork holds the GIL, so none can enter one
// meanwhile; a thread leaves the count before it asks for the GIL back, so it
// never waits for the forking thread.
#pragma once

#include <Python.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "moe/layer_queue.h"
#include "thread_pool.h"

namespace kt {
namespace py_calls {

inline std::atomic<int> g_in_native{0};   // threads inside a released section, before asking for the GIL back
inline std::atomic<int> g_not_back{0};    // the same, until they have the GIL back
inline std::atomic<bool> g_exiting{false};
inline std::atomic<std::thread::id> g_exit_thread{};

// How long fork and exit wait for calls in progress: longer than any single
// layer call (a large prefill takes seconds), short enough that a wedged
// call (a stream that never runs) does not hang the process.
constexpr std::chrono::seconds kQuiesceBound{20};

inline bool must_park() {
  return g_exiting.load() && std::this_thread::get_id() != g_exit_thread.load();
}

[[noreturn]] inline void park_forever() {
  for (;;) pause();
}

template <typename Pred>
inline bool poll_until(Pred done, std::chrono::steady_clock::time_point deadline) {
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return done();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return true;
}

}  // namespace py_calls

class GilRelease {
 public:
  GilRelease() {
    using namespace py_calls;
    if (must_park()) {  // the interpreter is exiting: do not start work it may free
      PyEval_SaveThread();
      park_forever();
    }
    g_in_native.fetch_add(1);
    g_not_back.fetch_add(1);
    state_ = PyEval_SaveThread();
  }
  ~GilRelease() {
    using namespace py_calls;
    g_in_native.fetch_sub(1);
    if (must_park()) {
      g_not_back.fetch_sub(1);
      park_forever();
    }
    PyEval_RestoreThread(state_);
    g_not_back.fetch_sub(1);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

namespace py_calls {

// Called with the GIL, by the thread that will finalize. Returns true if
// everything finished within timeout_s.
inline bool prepare_for_exit(double timeout_s) {
  g_exit_thread.store(std::this_thread::get_id());
  g_exiting.store(true);
  const auto deadline =
      std::chrono::steady_clock::now() +
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(timeout_s));
  PyThreadState* st = PyEval_SaveThread();  // the threads we wait for may need the GIL to get back
  bool ok = poll_until([] { return g_not_back.load() == 0; }, deadline);
  ok = LayerQueue::instance().wait_idle(deadline) && ok;
  PyEval_RestoreThread(st);
  return ok;
}

inline void fork_prepare() {
  if (poll_until([] { return g_in_native.load() == 0; }, std::chrono::steady_clock::now() + kQuiesceBound)) return;
  std::fprintf(stderr, "kt_kernel: fork() went ahead with %d call(s) still running on other threads; the child "
               "may find their locks held\n", g_in_native.load());
}

inline void fork_child() {
  // The threads counted are not in this process.
  g_in_native.store(0);
  g_not_back.store(0);
}

// Called once, at import. Its prepare runs before the layer queue's and the
// pools': the calls it waits for need both.
inline void install_fork_handlers() {
  ForkHandlers h;
  h.prepare = &fork_prepare;
  h.child = &fork_child;
  add_fork_handlers(0, h);
}

}  // namespace py_calls
}  // namespace kt
