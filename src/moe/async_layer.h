// submit / sync for one MoE layer (INTERFACE.md "submit_forward",
// "Ordering with a CUDA stream", "Expert deferral").
//
// submit stages the inputs into buffers the layer owns, then queues the layer
// task on the process-wide LayerQueue and returns; sync waits for it.
//   - CPU mode: the inputs are copied on the calling thread before submit
//     returns (the caller may overwrite them at once); the task writes the
//     caller's output buffer directly.
//   - Stream mode (a CUDA stream was given, or the inputs live on a device):
//     submit only enqueues on the stream: device-to-host copies of the inputs
//     into pinned staging, then a host function that queues the task. sync
//     enqueues a host function that blocks the stream until the task is done,
//     then the host-to-device copy of the output. Every call is
//     stream-ordered and allocation-free once a size's staging exists, so a
//     CUDA graph can capture submit + sync and replay them.
// Staging sets (the buffers of one layer call in flight) come from a
// process-wide pool per capture batch size (persistent, so a captured graph's
// addresses stay valid) plus one growable pool for the other sizes. A set is
// held from submit until that call's sync, and, when the call defers
// experts, until the sync of the layer that consumes them: two calls in
// flight never share one. The lowest free set is taken, so a fixed order of
// calls (a model's layers) always gets the same sets: one for all layers
// without deferral, two alternating with it (see Staging in the .cpp).
// The token count a task computes is read from its slot when the task runs
// (optionally copied in stream order from a device scalar), so one captured
// graph can serve fewer real tokens than its size.
//
// Expert deferral: with d > 0, a second task computes each token's d
// lowest-weight CPU pairs; its fp32 output is added into the output of the
// next layer submitted after it (in the same process), by that layer's main
// task. The deferred task is queued before that main task, so it is done by
// then (FIFO); the sync of the deferring layer waits for its main task only.
// The consumer must be a later layer (a greater layer_idx) running the same
// token count; otherwise its submit raises, naming both layers, and the
// deferred part is dropped (so the next call starts clean): a deferred part
// never lands in an unrelated call (the last MoE layer of a model must pass
// max_deferred_experts_per_token = 0, as SGLang does).
//
// Lifetimes: every object a queued task or a stream host function reads is
// its slot, or held by its slot through a shared_ptr that changes only after
// the slot's work has drained; the destructor drains every slot, so a layer
// destroyed with work pending waits for it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "kt_kernel/moe_layer.h"
#include "moe/layer_queue.h"

namespace kt {

// Host memory, pinned through the CUDA runtime when a stream uses it (so
// copies are truly asynchronous and capturable), else 64-byte aligned.
class HostBuffer {
 public:
  HostBuffer() = default;
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  // At least `bytes`, pinned if asked; contents are not preserved on growth.
  // Returns true if it (re)allocated.
  bool ensure(size_t bytes, bool pinned);
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool pinned() const { return pinned_; }

 private:
  void release();
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool pinned_ = false;
};

struct AsyncSubmitArgs {
  size_t tokens = 0;  // rows of the caller's tensors
  const void* x = nullptr;
  DType x_dtype = DType::kF32;
  size_t x_stride = 0;  // elements
  const void* ids = nullptr;
  bool ids_int64 = false;
  size_t ids_stride = 0;
  const void* weights = nullptr;
  DType weights_dtype = DType::kF32;
  size_t weights_stride = 0;
  const uint8_t* skip_mask = nullptr;  // read when the task runs (servers update it between forwards)
  void* y = nullptr;                   // CPU mode: the output [tokens][hidden], written by the task
  DType y_dtype = DType::kF32;         // both modes
  size_t y_stride = 0;
  uint32_t deferred_per_token = 0;     // d
  int64_t* expert_counts = nullptr;    // [num_experts] or null: += routed pairs per expert (valid ids, mask ignored)
  bool persistent = false;             // tokens is a capture batch size: its staging persists
  bool use_stream = false;             // stream mode
  void* stream = nullptr;              // cudaStream_t (null = the legacy default stream)
  const void* tokens_device = nullptr; // stream mode, optional: int64 token count copied in stream order
  bool run_inline = false;             // CPU mode: run the task on this thread now if the queue is idle
                                       // (the caller syncs at once); see LayerQueue::run_or_push
};

class AsyncLayer {
 public:
  AsyncLayer(MoeLayer& layer, int layer_idx);
  ~AsyncLayer();  // waits for this layer's queued work (and releases its staging)

  // Throws std::invalid_argument / std::runtime_error (including a failure
  // of an earlier stream-mode task of this layer) before queuing anything.
  void submit(const AsyncSubmitArgs& a);

  // CPU mode: waits for the main task and rethrows its error. Stream mode:
  // enqueues the wait and the copy of the output into y (device or host
  // memory, [tokens][hidden], y_stride elements) on the stream.
  void sync(void* y, size_t y_stride);

  // submit then sync in one call (forward()): nothing can come between them,
  // so an interrupted caller never leaves a submit pending.
  void forward(const AsyncSubmitArgs& a, void* y, size_t y_stride);

  bool pending() const { return pending_ != nullptr; }

  // Waits until none of this layer's work is queued, running, or still on a
  // stream (a host sync): weights may then change. Throws if a submit is
  // pending (its sync must come first).
  void drain();
  // The same wait, pending submit or not (before the objects the work reads
  // are freed: the owner's finalizer).
  void wait_idle();

  // Drops this layer's per-size slots (waits for their queued work first).
  void clear_persistent();
  // Drops the process-wide staging sets not held by a call in flight (after
  // every layer's clear_persistent this frees their memory).
  static void release_shared_staging();

  // Staging slots held (persistent sizes + the growable one), for tests.
  size_t num_slots() const;
  // Staging sets in the process-wide pools (held or free), for tests.
  static size_t num_staging_sets();

  struct Slot;
  struct Staging;

 private:
  std::shared_ptr<Slot> slot_for(const AsyncSubmitArgs& a);

  MoeLayer& layer_;
  int layer_idx_;
  std::map<size_t, std::shared_ptr<Slot>> persistent_;
  std::shared_ptr<Slot> dynamic_;
  std::shared_ptr<Slot> pending_;  // submitted, not yet synced
};

}  // namespace kt
