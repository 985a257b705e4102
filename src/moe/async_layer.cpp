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
  AsyncLayer::Slot* add_from = nullptr;
  const void* group = nullptr;
  bool tokens_from_device = false;
  bool operator==(const Params& o) const {
    return tokens == o.tokens && x_dtype == o.x_dtype && ids_int64 == o.ids_int64 && w_dtype == o.w_dtype &&
           y_dtype == o.y_dtype && mask == o.mask && y == o.y && y_stride == o.y_stride && deferred == o.deferred &&
           counts == o.counts && add_from == o.add_from && group == o.group &&
           tokens_from_device == o.tokens_from_device;
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

// Staging shared by the layers of one parity (layer_idx & 1) for one batch
// size (or the growable set) and one mode: layers run one after the other, so
// two alternating sets suffice, instead of one per layer (a server has ~60
// layers and ~30 capture sizes). Layer L's copies into a set are ordered after
// layer L-2's work on it: its main task has finished (synced before; in
// stream order on a stream), and its deferred task is waited for explicitly
// (usually long done: FIFO put it before layer L-1's main task).
struct AsyncLayer::Group {
  HostBuffer x, ids, w, y, yf, dy;
  std::shared_ptr<Slot> last_user;  // the slot whose tasks last used these buffers
};

namespace {

// Everything process-wide: the staging groups, and the deferred output of the
// last submit with d > 0, not yet consumed (the next submit, of any layer,
// adds it into its output). Never destroyed: freeing pinned memory from a
// static destructor would call the CUDA runtime while it shuts down.
std::mutex g_mutex;
auto& g_groups = *new std::map<uint64_t, std::shared_ptr<AsyncLayer::Group>>();
auto& g_deferred = *new std::shared_ptr<AsyncLayer::Slot>();

uint64_t group_key(size_t tokens, bool persistent, bool stream, int layer_idx) {
  return (uint64_t(persistent ? tokens : 0) << 2) | (uint64_t(stream) << 1) | uint64_t(layer_idx & 1);
}

}  // namespace

struct AsyncLayer::Slot {
  MoeLayer* layer = nullptr;
  int layer_idx = 0;
  std::shared_ptr<Group> g;  // the staging this slot's tasks read and write
  HostBuffer meta;           // int64 token count, read when the task runs
  Params p;
  std::shared_ptr<Slot> add_from_keep;  // keeps p.add_from alive
  QueuedTask main, deferred;
  std::exception_ptr main_error, deferred_error;  // written by the task, read after waiting for it
  size_t dy_tokens = 0;
  bool used_stream = false;
  void* last_stream = nullptr;

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
    a.x = g->x.data();
    a.x_dtype = p.x_dtype;
    a.x_stride = c.hidden;
    a.ids = g->ids.data();
    a.ids_int64 = p.ids_int64;
    a.ids_stride = c.top_k;
    a.weights = g->w.data();
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
      if (Slot* prev = s.p.add_from) {
        if (prev->deferred_error) std::rethrow_exception(prev->deferred_error);
        if (prev->dy_tokens != T)
          throw std::invalid_argument("the deferred experts of layer " + std::to_string(prev->layer_idx) + " cover " +
                                      std::to_string(prev->dy_tokens) + " tokens, but layer " +
                                      std::to_string(s.layer_idx) + " runs " + std::to_string(T));
        float* yf = reinterpret_cast<float*>(s.g->yf.data());
        a.y = yf;
        a.y_dtype = DType::kF32;
        a.y_stride = H;
        s.layer->forward(a);
        const float* dy = reinterpret_cast<const float*>(prev->g->dy.data());
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
          const int64_t e = s.p.ids_int64 ? reinterpret_cast<const int64_t*>(s.g->ids.data())[i]
                                          : reinterpret_cast<const int32_t*>(s.g->ids.data())[i];
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
    const size_t H = s.layer->config().hidden;
    try {
      const size_t T = s.tokens_now();
      MoeForwardArgs a = s.base_args(T);
      a.pair_filter = PairFilter::kDeferredOnly;
      a.y = s.g->dy.data();
      a.y_dtype = DType::kF32;
      a.y_stride = H;
      s.layer->forward(a);
      s.dy_tokens = T;
      s.deferred_error = nullptr;
    } catch (...) {
      s.deferred_error = std::current_exception();
      s.dy_tokens = 0;
    }
  }

  // Stream host functions (run on the CUDA runtime's callback thread).
  static void cb_wait_deferred(void* arg) { LayerQueue::instance().wait(&static_cast<Slot*>(arg)->deferred); }
  static void cb_enqueue(void* arg) {
    Slot& s = *static_cast<Slot*>(arg);
    LayerQueue::instance().push(&s.main);
    if (s.p.deferred) LayerQueue::instance().push(&s.deferred);
  }
  static void cb_wait_main(void* arg) { LayerQueue::instance().wait(&static_cast<Slot*>(arg)->main); }

  // Waits until no task of this slot is queued, running, or still to be
  // queued by a stream (or a replayed graph) on its last stream: a host sync,
  // so never on a captured path.
  void quiesce() {
    if (used_stream) {
      const CudaRuntime& rt = cuda_runtime();
      rt.check(rt.stream_synchronize(last_stream), "cudaStreamSynchronize");
    }
    LayerQueue::instance().wait(&main);
    LayerQueue::instance().wait(&deferred);
  }

  void rethrow_stream_error() {
    if (!used_stream || in_flight()) return;
    std::exception_ptr e = main_error ? main_error : deferred_error;
    main_error = deferred_error = nullptr;
    if (e) std::rethrow_exception(e);
  }
};

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
}

void AsyncLayer::clear_persistent() {
  for (auto& kv : persistent_) kv.second->quiesce();
  persistent_.clear();
}

void AsyncLayer::release_shared_staging() {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto& kv : g_groups)
    if (kv.second->last_user) kv.second->last_user->quiesce();
  g_groups.clear();  // slots still holding a group keep it until they are cleared or reused
}

size_t AsyncLayer::num_slots() const { return persistent_.size() + (dynamic_ ? 1 : 0); }

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
  std::shared_ptr<Group>& gref = g_groups[group_key(a.tokens, a.persistent, a.use_stream, layer_idx_)];
  if (!gref) gref = std::make_shared<Group>();
  std::shared_ptr<Group> g = gref;
  std::shared_ptr<Slot> prev = g_deferred;
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
  p.add_from = prev.get();
  p.group = g.get();
  p.tokens_from_device = a.use_stream && a.tokens_device;
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
               {&g->yf, prev ? T * H * sizeof(float) : 0},
               {&g->dy, p.deferred ? T * H * sizeof(float) : 0},
               {&s->meta, 64}};
  bool grow = false;
  for (const Need& n : needs)
    if (n.bytes && (!n.b->data() || n.b->size() < n.bytes || (pin && !n.b->pinned()))) grow = true;
  if (grow) {
    if (g->last_user) g->last_user->quiesce();
    s->quiesce();
  }
  if (!a.use_stream) s->quiesce();
  for (const Need& n : needs)
    if (n.bytes) n.b->ensure(n.bytes, pin);
  p.y = a.use_stream ? static_cast<void*>(g->y.data()) : a.y;
  if (!(p == s->p)) {
    s->quiesce();
    s->p = p;
    s->g = g;
    *s->tokens_field() = int64_t(T);
  }
  s->used_stream = a.use_stream;
  s->last_stream = a.stream;
  // The group's previous user (usually layer L-2, or this slot) may still run
  // a deferred task that reads the staging this call overwrites.
  Slot* before = g->last_user ? g->last_user.get() : nullptr;

  if (!a.use_stream) {
    if (before) LayerQueue::instance().wait(&before->deferred);
    copy_rows(g->x.data(), H * xs, a.x, a.x_stride * xs, H * xs, T);
    copy_rows(g->ids.data(), K * is, a.ids, a.ids_stride * is, K * is, T);
    copy_rows(g->w.data(), K * ws, a.weights, a.weights_stride * ws, K * ws, T);
    *s->tokens_field() = int64_t(T);
    if (a.run_inline)
      LayerQueue::instance().run_or_push(&s->main);
    else
      LayerQueue::instance().push(&s->main);
    if (p.deferred) LayerQueue::instance().push(&s->deferred);
  } else {
    const int kind = CudaRuntime::kMemcpyDefault;
    void* st = a.stream;
    if (before && before->p.deferred)
      rt->check(rt->launch_host_func(st, &Slot::cb_wait_deferred, before), "cudaLaunchHostFunc");
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
    rt->check(rt->launch_host_func(st, &Slot::cb_enqueue, s.get()), "cudaLaunchHostFunc");
  }
  g->last_user = s;
  g_deferred = p.deferred ? s : nullptr;
  s->add_from_keep = prev.get() == s.get() ? nullptr : prev;
  pending_ = s;
}

void AsyncLayer::sync(void* y, size_t y_stride) {
  if (!pending_) throw std::runtime_error("layer " + std::to_string(layer_idx_) + ": sync_forward called without submit_forward");
  std::shared_ptr<Slot> s = std::move(pending_);
  pending_ = nullptr;
  if (!s->used_stream) {
    LayerQueue::instance().wait(&s->main);
    if (std::exception_ptr e = s->main_error) {
      s->main_error = nullptr;
      std::rethrow_exception(e);
    }
    return;
  }
  const CudaRuntime& rt = cuda_runtime();
  const size_t H = layer_.config().hidden, ys = dtype_size(s->p.y_dtype);
  rt.check(rt.launch_host_func(s->last_stream, &Slot::cb_wait_main, s.get()), "cudaLaunchHostFunc");
  if (s->p.tokens)
    rt.check(rt.memcpy_2d_async(y, y_stride * ys, s->p.y, H * ys, H * ys, s->p.tokens, CudaRuntime::kMemcpyDefault,
                                s->last_stream),
             "cudaMemcpy2DAsync (output)");
}

}  // namespace kt
