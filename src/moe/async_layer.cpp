#include "moe/async_layer.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "moe/cuda_runtime.h"

namespace kt {

// ---------------------------------------------------------------- HostBuffer
HostBuffer::~HostBuffer() { release(); }

void HostBuffer::release() {
  if (!data_) return;
  if (pinned_)
    cuda_runtime().free_host(data_);
  else
    std::free(data_);
  data_ = nullptr;
  size_ = 0;
  pinned_ = false;
}

bool HostBuffer::ensure(size_t bytes, bool pinned) {
  bytes = std::max<size_t>(bytes, 64);
  if (data_ && size_ >= bytes && (pinned_ || !pinned)) return false;
  release();
  const size_t rounded = (bytes + 63) / 64 * 64;
  if (pinned) {
    void* p = nullptr;
    const CudaRuntime& rt = cuda_runtime();
    rt.check(rt.host_alloc(&p, rounded, 0), "cudaHostAlloc (kt_kernel staging)");
    data_ = static_cast<uint8_t*>(p);
  } else {
    data_ = static_cast<uint8_t*>(std::aligned_alloc(64, rounded));
    if (!data_) throw std::bad_alloc();
  }
  size_ = rounded;
  pinned_ = pinned;
  return true;
}

// ---------------------------------------------------------------- the slot
namespace {

// Parameters of a slot's tasks. The host writes them only while none of the
// slot's tasks is in flight, or leaves them unchanged (the steady state of a
// captured size), so a task never reads a half-written set.
struct Params {
  size_t tokens = 0;  // rows staged (the count actually computed is read at run time)
  DType x_dtype = DType::kF32;
  bool ids_int64 = false;
  DType w_dtype = DType::kF32;
  DType y_dtype = DType::kF32;
  const uint8_t* mask = nullptr;
  void* y = nullptr;
  size_t y_stride = 0;
  uint32_t deferred = 0;
  int64_t* counts = nullptr;
  const AsyncLayer::Staging* add_from = nullptr;  // the staging holding the deferred output to add
  int add_from_layer = -1;                        // its producer (for messages)
  const AsyncLayer::Staging* staging = nullptr;   // the staging this call reads and writes
  bool tokens_from_device = false;
  bool use_stream = false;
  void* stream = nullptr;  // with use_stream (null: the legacy default stream)
  bool operator==(const Params& o) const {
    return tokens == o.tokens && x_dtype == o.x_dtype && ids_int64 == o.ids_int64 && w_dtype == o.w_dtype &&
           y_dtype == o.y_dtype && mask == o.mask && y == o.y && y_stride == o.y_stride && deferred == o.deferred &&
           counts == o.counts && add_from == o.add_from && add_from_layer == o.add_from_layer &&
           staging == o.staging && tokens_from_device == o.tokens_from_device && use_stream == o.use_stream &&
           stream == o.stream;
  }
};

void store_row(const float* src, size_t n, void* dst, DType dt) {
  switch (dt) {
    case DType::kF32: std::memcpy(dst, src, n * sizeof(float)); break;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_bf16(src[i]);
      break;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_f16(src[i]);
      break;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) static_cast<double*>(dst)[i] = src[i];
      break;
  }
}

void copy_rows(void* dst, size_t dst_row_bytes, const void* src, size_t src_row_bytes, size_t row_bytes, size_t rows) {
  for (size_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<uint8_t*>(dst) + r * dst_row_bytes, static_cast<const uint8_t*>(src) + r * src_row_bytes,
                row_bytes);
}

}  // namespace

// The buffers of one layer call in flight. Sets are pooled per batch size and
// mode instead of owned per layer (a server has ~60 layers and ~30 capture
// sizes). A set is held (holds > 0) from its call's submit to its sync, plus,
// when the call defers experts, until the consumer's sync: the consumer's main
// task reads dy, and it runs after the deferred task (FIFO), so once both
// syncs have passed nothing reads or writes the set any more, in host order
// (CPU mode) or in stream order (a later user's copies are queued after the
// consumer's wait on the same stream).
struct AsyncLayer::Staging {
  HostBuffer x, ids, w, y, yf, dy;
  // Written by the deferred task, read by the consumer's main task after it.
  size_t dy_tokens = 0;
  std::exception_ptr deferred_error;
  // Host side, under g_mutex.
  int holds = 0;
  std::shared_ptr<Slot> last_user;  // drained before the buffers are reallocated
};

namespace {

// A deferred output waiting for the next submit.
struct PendingDeferral {
  std::shared_ptr<AsyncLayer::Staging> staging;
  std::shared_ptr<AsyncLayer::Slot> producer;
  int layer_idx = -1;
  size_t tokens = 0;
  bool tokens_from_device = false;
};

// Everything process-wide: the staging pools, and the deferred output of the
// last submit with d > 0, not yet consumed. Never destroyed: freeing pinned
// memory from a static destructor would call the CUDA runtime while it shuts
// down.
std::mutex g_mutex;
auto& g_pools = *new std::map<uint64_t, std::vector<std::shared_ptr<AsyncLayer::Staging>>>();
auto& g_deferred = *new PendingDeferral();

uint64_t pool_key(size_t tokens, bool persistent, bool stream) {
  return (uint64_t(persistent ? tokens : 0) << 1) | uint64_t(stream);
}

// The lowest free set of a pool (a new one if all are held): deterministic,
// so a repeated sequence of calls (a captured graph's) always gets the same.
std::shared_ptr<AsyncLayer::Staging> take_free(uint64_t key) {
  auto& pool = g_pools[key];
  for (auto& st : pool)
    if (st->holds == 0) return st;
  pool.push_back(std::make_shared<AsyncLayer::Staging>());
  return pool.back();
}

void release(std::shared_ptr<AsyncLayer::Staging>& st) {
  if (st) --st->holds;
  st.reset();
}

}  // namespace

struct AsyncLayer::Slot {
  MoeLayer* layer = nullptr;  // outlives the slot's tasks: ~AsyncLayer drains them first
  int layer_idx = 0;
  std::shared_ptr<Staging> staging;   // p.staging, kept alive
  std::shared_ptr<Staging> add_from;  // p.add_from, kept alive
  HostBuffer meta;                    // int64 token count, read when the task runs
  Params p;
  QueuedTask main, deferred;
  std::exception_ptr main_error, deferred_error;  // written by the task, read after waiting for it
  // The holds of the call in flight (under g_mutex), released by its sync.
  std::shared_ptr<Staging> hold_own, hold_consumed;

  int64_t* tokens_field() const { return reinterpret_cast<int64_t*>(meta.data()); }
  bool in_flight() const { return main.busy.load(std::memory_order_acquire) || deferred.busy.load(std::memory_order_acquire); }

  size_t tokens_now() const {
    const int64_t n = *reinterpret_cast<volatile int64_t*>(tokens_field());
    return n < 0 ? 0 : std::min(size_t(n), p.tokens);
  }

  MoeForwardArgs base_args(size_t T) const {
    const MoeConfig& c = layer->config();
    MoeForwardArgs a;
    a.tokens = T;
    a.x = staging->x.data();
    a.x_dtype = p.x_dtype;
    a.x_stride = c.hidden;
    a.ids = staging->ids.data();
    a.ids_int64 = p.ids_int64;
    a.ids_stride = c.top_k;
    a.weights = staging->w.data();
    a.weights_dtype = p.w_dtype;
    a.weights_stride = c.top_k;
    a.skip_mask = p.mask;
    a.deferred_per_token = p.deferred;
    return a;
  }

  static void run_main(void* arg) {
    Slot& s = *static_cast<Slot*>(arg);
    const MoeConfig& c = s.layer->config();
    const size_t H = c.hidden;
    const size_t ysz = dtype_size(s.p.y_dtype);
    uint8_t* y = static_cast<uint8_t*>(s.p.y);
    size_t T = 0;
    try {
      T = s.tokens_now();
      MoeForwardArgs a = s.base_args(T);
      a.pair_filter = s.p.deferred ? PairFilter::kMainOnly : PairFilter::kAll;
      if (const Staging* prev = s.add_from.get()) {
        if (prev->deferred_error) std::rethrow_exception(prev->deferred_error);
        if (prev->dy_tokens != T)
          throw std::invalid_argument("the deferred experts of layer " + std::to_string(s.p.add_from_layer) +
                                      " cover " + std::to_string(prev->dy_tokens) + " tokens, but layer " +
                                      std::to_string(s.layer_idx) + " runs " + std::to_string(T));
        float* yf = reinterpret_cast<float*>(s.staging->yf.data());
        a.y = yf;
        a.y_dtype = DType::kF32;
        a.y_stride = H;
        s.layer->forward(a);
        const float* dy = reinterpret_cast<const float*>(prev->dy.data());
        for (size_t t = 0; t < T; ++t) {
          float* row = yf + t * H;
          for (size_t i = 0; i < H; ++i) row[i] += dy[t * H + i];
          store_row(row, H, y + t * s.p.y_stride * ysz, s.p.y_dtype);
        }
      } else {
        a.y = y;
        a.y_dtype = s.p.y_dtype;
        a.y_stride = s.p.y_stride;
        s.layer->forward(a);
      }
      // Rows past the count read at run time (a captured size running fewer tokens).
      for (size_t t = T; t < s.p.tokens; ++t) std::memset(y + t * s.p.y_stride * ysz, 0, H * ysz);
      if (int64_t* counts = s.p.counts) {
        const size_t n = T * c.top_k;
        for (size_t i = 0; i < n; ++i) {
          const int64_t e = s.p.ids_int64 ? reinterpret_cast<const int64_t*>(s.staging->ids.data())[i]
                                          : reinterpret_cast<const int32_t*>(s.staging->ids.data())[i];
          if (e >= 0 && e < int64_t(c.num_experts)) ++counts[e];
        }
      }
      s.main_error = nullptr;
    } catch (...) {
      s.main_error = std::current_exception();
    }
  }

  static void run_deferred(void* arg) {
    Slot& s = *static_cast<Slot*>(arg);
    Staging& st = *s.staging;
    const size_t H = s.layer->config().hidden;
    try {
      const size_t T = s.tokens_now();
      MoeForwardArgs a = s.base_args(T);
      a.pair_filter = PairFilter::kDeferredOnly;
      a.y = st.dy.data();
      a.y_dtype = DType::kF32;
      a.y_stride = H;
      s.layer->forward(a);
      st.dy_tokens = T;
      st.deferred_error = nullptr;
    } catch (...) {
      st.deferred_error = std::current_exception();
      st.dy_tokens = 0;
    }
  }

  // Stream host functions (run on the CUDA runtime's callback thread); their
  // argument is the slot itself, which outlives them (see the header).
  static void cb_enqueue(void* arg) {
    Slot& s = *static_cast<Slot*>(arg);
    LayerQueue::instance().push(&s.main);
    if (s.p.deferred) LayerQueue::instance().push(&s.deferred);
  }
  static void cb_wait_main(void* arg) { LayerQueue::instance().wait(&static_cast<Slot*>(arg)->main); }

  // Waits until no task of this slot is queued, running, or still to be
  // queued by a stream (or a replayed graph) on its stream: a host sync, so
  // never on a captured path.
  void quiesce() {
    if (p.use_stream) {
      const CudaRuntime& rt = cuda_runtime();
      rt.check(rt.stream_synchronize(p.stream), "cudaStreamSynchronize");
    }
    LayerQueue::instance().wait(&main);
    LayerQueue::instance().wait(&deferred);
  }

  void rethrow_stream_error() {
    if (!p.use_stream || in_flight()) return;
    std::exception_ptr e = main_error ? main_error : deferred_error;
    main_error = deferred_error = nullptr;
    if (e) std::rethrow_exception(e);
  }

  // Under g_mutex: the holds of the call in flight are given back.
  void release_holds() {
    release(hold_own);
    release(hold_consumed);
  }
};

namespace {

// Under g_mutex: forgets a deferred output that no later layer will consume,
// after its task is done (nothing else orders it before the set's next user).
void drop_deferral() {
  PendingDeferral d = std::move(g_deferred);
  g_deferred = PendingDeferral();
  if (!d.staging) return;
  try {
    d.producer->quiesce();
  } catch (...) {
  }
  --d.staging->holds;
}

}  // namespace

// ---------------------------------------------------------------- AsyncLayer
AsyncLayer::AsyncLayer(MoeLayer& layer, int layer_idx) : layer_(layer), layer_idx_(layer_idx) {}

AsyncLayer::~AsyncLayer() {
  auto drain = [](const std::shared_ptr<Slot>& s) {
    if (!s) return;
    try {
      s->quiesce();
    } catch (...) {
    }
  };
  for (auto& kv : persistent_) drain(kv.second);
  drain(dynamic_);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (pending_) pending_->release_holds();
  // A deferred output of this layer stays for its consumer: it lives in the
  // staging set, and the producer slot (held by g_deferred) is drained.
}

void AsyncLayer::drain() {
  if (pending_)
    throw std::runtime_error("layer " + std::to_string(layer_idx_) +
                             ": a submit_forward is pending; call sync_forward first");
  wait_idle();
}

void AsyncLayer::wait_idle() {
  for (auto& kv : persistent_) kv.second->quiesce();
  if (dynamic_) dynamic_->quiesce();
}

void AsyncLayer::clear_persistent() {
  for (auto& kv : persistent_) kv.second->quiesce();
  for (auto it = persistent_.begin(); it != persistent_.end();)
    it = it->second == pending_ ? std::next(it) : persistent_.erase(it);  // a call in flight keeps its slot
}

void AsyncLayer::release_shared_staging() {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto& kv : g_pools) {
    auto& pool = kv.second;
    for (auto it = pool.begin(); it != pool.end();) {
      if ((*it)->holds) {
        ++it;
        continue;
      }
      if ((*it)->last_user) (*it)->last_user->quiesce();
      (*it)->last_user.reset();
      it = pool.erase(it);  // slots still pointing at it keep it until they are cleared or reused
    }
  }
}

size_t AsyncLayer::num_slots() const { return persistent_.size() + (dynamic_ ? 1 : 0); }

size_t AsyncLayer::num_staging_sets() {
  std::lock_guard<std::mutex> lock(g_mutex);
  size_t n = 0;
  for (auto& kv : g_pools) n += kv.second.size();
  return n;
}

std::shared_ptr<AsyncLayer::Slot> AsyncLayer::slot_for(const AsyncSubmitArgs& a) {
  // CPU-mode and stream-mode calls of one size keep separate slots: a
  // captured graph's slot must not see the parameters of a CPU-mode call.
  std::shared_ptr<Slot>& s = a.persistent ? persistent_[a.tokens * 2 + (a.use_stream ? 1 : 0)] : dynamic_;
  if (!s) {
    s = std::make_shared<Slot>();
    s->layer = &layer_;
    s->layer_idx = layer_idx_;
    s->main.fn = &Slot::run_main;
    s->main.arg = s.get();
    s->deferred.fn = &Slot::run_deferred;
    s->deferred.arg = s.get();
  }
  return s;
}

void AsyncLayer::submit(const AsyncSubmitArgs& a) {
  const MoeConfig& c = layer_.config();
  if (pending_)
    throw std::runtime_error("layer " + std::to_string(layer_idx_) + ": submit_forward called twice without sync_forward");
  if (a.deferred_per_token > c.top_k)
    throw std::invalid_argument("max_deferred_experts_per_token (" + std::to_string(a.deferred_per_token) +
                                ") exceeds num_experts_per_tok (" + std::to_string(c.top_k) + ")");
  const CudaRuntime* rt = a.use_stream ? &cuda_runtime() : nullptr;
  std::shared_ptr<Slot> s = slot_for(a);
  s->rethrow_stream_error();

  std::lock_guard<std::mutex> glock(g_mutex);
  // The deferred output of an earlier call goes into this one only if this is
  // a later layer running the same tokens; anything else is a model whose
  // last deferring layer has no consumer, or unrelated calls in between.
  if (g_deferred.staging) {
    const PendingDeferral& d = g_deferred;
    std::string why;
    if (d.layer_idx >= layer_idx_)
      why = "layer " + std::to_string(layer_idx_) + " is not after layer " + std::to_string(d.layer_idx) +
            " (pass max_deferred_experts_per_token=0 on the last MoE layer of a model)";
    else if (!d.tokens_from_device && !(a.use_stream && a.tokens_device) && d.tokens != a.tokens)
      why = "layer " + std::to_string(layer_idx_) + " runs " + std::to_string(a.tokens) + " tokens, layer " +
            std::to_string(d.layer_idx) + " ran " + std::to_string(d.tokens);
    if (!why.empty()) {
      const int from = d.layer_idx;
      drop_deferral();
      throw std::runtime_error("the deferred experts of layer " + std::to_string(from) +
                               " (max_deferred_experts_per_token > 0) have no consumer: " + why +
                               "; they were dropped");
    }
  }
  const PendingDeferral prev = g_deferred;
  std::shared_ptr<Staging> g = take_free(pool_key(a.tokens, a.persistent, a.use_stream));
  const size_t T = a.tokens, H = c.hidden, K = c.top_k;
  const size_t xs = dtype_size(a.x_dtype), is = a.ids_int64 ? 8 : 4, ws = dtype_size(a.weights_dtype),
               ys = dtype_size(a.y_dtype);
  Params p;
  p.tokens = T;
  p.x_dtype = a.x_dtype;
  p.ids_int64 = a.ids_int64;
  p.w_dtype = a.weights_dtype;
  p.y_dtype = a.y_dtype;
  p.mask = a.skip_mask;
  p.deferred = a.deferred_per_token;
  p.counts = a.expert_counts;
  p.add_from = prev.staging.get();
  p.add_from_layer = prev.layer_idx;
  p.staging = g.get();
  p.tokens_from_device = a.use_stream && a.tokens_device;
  p.use_stream = a.use_stream;
  p.stream = a.use_stream ? a.stream : nullptr;
  p.y_stride = a.use_stream ? H : a.y_stride;

  // Buffers this call needs; growing one waits for all work on them (never
  // happens on a captured size after its first call).
  const bool pin = a.use_stream;
  struct Need {
    HostBuffer* b;
    size_t bytes;
  } needs[] = {{&g->x, T * H * xs},
               {&g->ids, T * K * is},
               {&g->w, T * K * ws},
               {&g->y, a.use_stream ? T * H * ys : 0},
               {&g->yf, prev.staging ? T * H * sizeof(float) : 0},
               {&g->dy, p.deferred ? T * H * sizeof(float) : 0},
               {&s->meta, 64}};
  bool grow = false;
  for (const Need& n : needs)
    if (n.bytes && (!n.b->data() || n.b->size() < n.bytes || (pin && !n.b->pinned()))) grow = true;
  if (grow) {
    if (g->last_user) g->last_user->quiesce();
    s->quiesce();
  }
  if (!a.use_stream) s->quiesce();  // its deferred task of the previous call may still read its old set
  for (const Need& n : needs)
    if (n.bytes) n.b->ensure(n.bytes, pin);
  p.y = a.use_stream ? static_cast<void*>(g->y.data()) : a.y;
  if (!(p == s->p)) {
    s->quiesce();
    s->p = p;
    s->staging = g;
    s->add_from = prev.staging;
    *s->tokens_field() = int64_t(T);
  }

  if (!a.use_stream) {
    copy_rows(g->x.data(), H * xs, a.x, a.x_stride * xs, H * xs, T);
    copy_rows(g->ids.data(), K * is, a.ids, a.ids_stride * is, K * is, T);
    copy_rows(g->w.data(), K * ws, a.weights, a.weights_stride * ws, K * ws, T);
    *s->tokens_field() = int64_t(T);
  } else {
    const int kind = CudaRuntime::kMemcpyDefault;
    void* st = a.stream;
    if (T) {
      rt->check(rt->memcpy_2d_async(g->x.data(), H * xs, a.x, a.x_stride * xs, H * xs, T, kind, st),
                "cudaMemcpy2DAsync (hidden_states)");
      rt->check(rt->memcpy_2d_async(g->ids.data(), K * is, a.ids, a.ids_stride * is, K * is, T, kind, st),
                "cudaMemcpy2DAsync (topk_ids)");
      rt->check(rt->memcpy_2d_async(g->w.data(), K * ws, a.weights, a.weights_stride * ws, K * ws, T, kind, st),
                "cudaMemcpy2DAsync (topk_weights)");
    }
    if (p.tokens_from_device)
      rt->check(rt->memcpy_2d_async(s->tokens_field(), 8, a.tokens_device, 8, 8, 1, kind, st),
                "cudaMemcpy2DAsync (token count)");
  }
  // Nothing below throws except a failed host-function launch (the stream
  // then holds nothing of this call's tasks): the holds are taken first, so
  // the call's state is complete whatever happens after.
  g->holds += 1 + (p.deferred ? 1 : 0);
  g->last_user = s;
  s->hold_own = g;
  s->hold_consumed = prev.staging;  // its deferred hold moves to this call, released by our sync
  g_deferred = PendingDeferral();
  if (p.deferred) {
    g_deferred.staging = g;
    g_deferred.producer = s;
    g_deferred.layer_idx = layer_idx_;
    g_deferred.tokens = T;
    g_deferred.tokens_from_device = p.tokens_from_device;
  }
  pending_ = s;
  if (!a.use_stream) {
    if (a.run_inline)
      LayerQueue::instance().run_or_push(&s->main);
    else
      LayerQueue::instance().push(&s->main);
    if (p.deferred) LayerQueue::instance().push(&s->deferred);
  } else {
    try {
      rt->check(rt->launch_host_func(a.stream, &Slot::cb_enqueue, s.get()), "cudaLaunchHostFunc");
    } catch (...) {  // nothing of this call will run: undo its bookkeeping
      if (p.deferred) --g->holds;
      release(s->hold_own);
      s->hold_consumed.reset();  // the earlier layer's deferred hold goes back to it
      g_deferred = prev;
      pending_ = nullptr;
      throw;
    }
  }
}

void AsyncLayer::sync(void* y, size_t y_stride) {
  if (!pending_) throw std::runtime_error("layer " + std::to_string(layer_idx_) + ": sync_forward called without submit_forward");
  std::shared_ptr<Slot> s = std::move(pending_);
  pending_ = nullptr;
  struct Release {  // the holds go back once this call's outcome is known (or an error leaves)
    Slot& s;
    ~Release() {
      std::lock_guard<std::mutex> lock(g_mutex);
      s.release_holds();
    }
  } release_at_exit{*s};
  if (!s->p.use_stream) {
    LayerQueue::instance().wait(&s->main);
    if (std::exception_ptr e = s->main_error) {
      s->main_error = nullptr;
      std::rethrow_exception(e);
    }
    return;
  }
  const CudaRuntime& rt = cuda_runtime();
  const size_t H = layer_.config().hidden, ys = dtype_size(s->p.y_dtype);
  rt.check(rt.launch_host_func(s->p.stream, &Slot::cb_wait_main, s.get()), "cudaLaunchHostFunc");
  if (s->p.tokens)
    rt.check(rt.memcpy_2d_async(y, y_stride * ys, s->p.y, H * ys, H * ys, s->p.tokens, CudaRuntime::kMemcpyDefault,
                                s->p.stream),
             "cudaMemcpy2DAsync (output)");
}

void AsyncLayer::forward(const AsyncSubmitArgs& a, void* y, size_t y_stride) {
  submit(a);
  sync(y, y_stride);
}

}  // namespace kt
