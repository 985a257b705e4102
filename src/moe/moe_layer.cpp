// Orchestration of one MoE layer call. Per pass of at most tokens_per_pass()
// tokens:
//   1. bucket the pairs by expert (routing.cpp);
//   2. convert x to fp32 and encode it once for the format (all experts and
//      all NUMA slices read the same encoded rows);
//   3. gate/up + activation: tasks = (slice, expert, block of rows), largest
//      experts first, each slice's tasks on its own sub-pool;
//   4. encode the intermediate once per pair row (over the full I, so the
//      result does not depend on the NUMA split);
//   5. down + weighted combine: tasks = (slice, block of output rows), each
//      looping over the active experts, so no two tasks write the same
//      output element and no per-pair output buffer is needed;
//   6. sum the slices' partial outputs and convert to the caller's dtype.
#include "kt_kernel/moe_layer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "aligned_buffer.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/pack.h"
#include "moe/pass_size.h"
#include "moe/routing.h"
#include "thread_pool.h"

namespace kt {
namespace {

// Slices of the intermediate dimension start on multiples of this many
// columns (kColPad, and any INT4 group up to 128), so every slice's packed K
// is whole groups and its activation view stays aligned.
constexpr uint32_t kSliceAlign = 128;

// Row conversions with the dtype switch outside the loop, so each loop is a
// plain vectorisable copy; bf16, what servers pass, through the backend's
// kernels (the baseline loops took ~1.3 cycles per value to narrow: 1.3 ms
// of a 2048-token Qwen3-30B-A3B call's combine on one core).
void row_to_f32(const void* src, DType dt, size_t n, float* dst, const RowConvertKernels& cv) {
  switch (dt) {
    case DType::kF32: std::memcpy(dst, src, n * sizeof(float)); break;
    case DType::kBF16: cv.bf16_to_f32(static_cast<const uint16_t*>(src), n, dst); break;
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      break;
    }
    case DType::kF64: {
      const double* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      break;
    }
  }
}

void row_from_f32(const float* src, size_t n, void* dst, DType dt, const RowConvertKernels& cv) {
  switch (dt) {
    case DType::kF32: std::memcpy(dst, src, n * sizeof(float)); break;
    case DType::kBF16: cv.f32_to_bf16(src, n, static_cast<uint16_t*>(dst)); break;
    case DType::kF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      break;
    }
    case DType::kF64: {
      double* d = static_cast<double*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = src[i];
      break;
    }
  }
}

// Encoded activation rows of one format (the ActsBuffer's storage).
struct EncodedRows {
  AlignedBuffer data, scale, sums;
  ActsBuffer buffer;

  void reserve(QuantScheme s, size_t rows, size_t k) {
    buffer.row_bytes = acts_row_bytes(s, k);
    buffer.group_sums_stride = acts_group_sums_per_row(s, k);
    data.ensure(std::max<size_t>(1, rows * buffer.row_bytes));
    scale.ensure(std::max<size_t>(1, rows) * sizeof(float));
    sums.ensure(std::max<size_t>(1, rows * buffer.group_sums_stride) * sizeof(int32_t));
    buffer.data = data.data();
    buffer.row_scale = reinterpret_cast<float*>(scale.data());
    buffer.group_sums = reinterpret_cast<int32_t*>(sums.data());
  }

  // The buffer from row row0 on: where an encoding task writes its rows.
  ActsBuffer from_row(size_t row0) const {
    ActsBuffer b = buffer;
    b.data += row0 * b.row_bytes;
    b.row_scale += row0;
    b.group_sums += row0 * b.group_sums_stride;
    return b;
  }

  // A view of rows [row0, row0 + rows) from column col0 (a multiple of 64).
  ActsView view(QuantScheme s, size_t row0, size_t rows, size_t col0, const int32_t* row_index) const {
    ActsView v;
    const size_t elem = scheme_bf16_acts(s) ? 2 : 1;
    v.data = buffer.data + row0 * buffer.row_bytes + col0 * elem;
    v.row_bytes = buffer.row_bytes;
    v.row_scale = buffer.row_scale + row0;
    v.group_sums = buffer.group_sums_stride ? buffer.group_sums + row0 * buffer.group_sums_stride + col0 / kActSumGroup
                                            : nullptr;
    v.group_sums_stride = buffer.group_sums_stride;
    v.row_index = row_index;
    v.rows = rows;
    return v;
  }
};

struct GateUpTask {
  uint32_t expert, block_begin, block_end;
  // The task covers the expert's whole intermediate row (every block, one
  // slice): it encodes the expert's rows of h itself, straight after
  // computing them, while they are still in its core's cache.
  bool encodes_rows;
};

// Rows [row0, row0 + rows) of h that the encoding step still has to encode.
struct RowRange {
  size_t row0, rows;
};

struct DownTask {
  uint32_t block_begin, block_end;
};

// Scratch shared by every layer of the process: layers run one at a time
// (they share the one worker pool), so one arena serves them all.
struct Scratch {
  std::mutex mutex;
  AlignedBuffer xf, h, y;
  EncodedRows qx, hq;
  Routing routing;
  std::vector<std::vector<GateUpTask>> gate_up_tasks;
  std::vector<std::vector<DownTask>> down_tasks;
  std::vector<float*> out_rows;
  std::vector<RowRange> rows_to_encode, encode_tasks;
  std::vector<size_t> task_counts;
  LayerPhaseTimes phases;  // under mutex
};

Scratch& scratch() {
  static Scratch s;
  return s;
}

// Adds the time since the previous mark to one phase's total.
class PhaseClock {
 public:
  explicit PhaseClock(LayerPhaseTimes& t) : t_(t), last_(std::chrono::steady_clock::now()) {}
  void mark(LayerPhase p) {
    const auto now = std::chrono::steady_clock::now();
    t_.seconds[p] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  LayerPhaseTimes& t_;
  std::chrono::steady_clock::time_point last_;
};

// Task boundaries fall on multiples of this many row blocks (every kernel's
// group of blocks per tile divides it), so a block's tile, and with it the
// floating-point summation order of BF16/FP8, never depends on how many
// threads split the work: 1, 2 and 3 threads give identical results.
constexpr size_t kTaskBlockAlign = 4;

size_t align_blocks(size_t per, size_t blocks) {
  per = (per + kTaskBlockAlign - 1) / kTaskBlockAlign * kTaskBlockAlign;
  return std::max<size_t>(1, std::min(per, blocks));
}

// The largest share of `blocks` any thread gets when tasks of `per` blocks
// (the last one shorter) go to the threads in turn: the step's span when
// the threads run at one speed.
size_t span_blocks(size_t blocks, size_t per, size_t threads) {
  const size_t tasks = (blocks + per - 1) / per, last = blocks - (tasks - 1) * per;
  size_t span = 0;
  for (size_t t = 0; t < threads && t < tasks; ++t) {
    const size_t mine = (tasks - t + threads - 1) / threads;
    const bool has_last = (tasks - 1) % threads == t;
    span = std::max(span, mine * per - (has_last ? per - last : 0));
  }
  return span;
}

// Blocks per task for about `tasks` tasks (a multiple of the thread count).
// Task boundaries on multiples of 4 blocks can leave the threads uneven
// shares (128 blocks in 6 tasks: 5 of 24 and one of 8, so one thread gets 72
// and the other 56): among task counts from `tasks` down, the one with the
// smallest per-thread span wins (128 blocks: 4 tasks of 32).
uint32_t even_blocks_per_task(size_t blocks, size_t tasks, size_t threads) {
  size_t best_per = blocks, best_span = blocks + 1;
  for (size_t n = tasks; n >= threads && n > 0; n -= threads) {
    const size_t per = align_blocks((blocks + n - 1) / n, blocks);
    const size_t span = span_blocks(blocks, per, threads);
    if (span < best_span) best_span = span, best_per = per;
  }
  return uint32_t(best_per);
}

// Down tasks at decode (few pairs): one per thread. Each task makes one call
// per active expert, and each call starts cold (its first lines come at DRAM
// latency before the kernel's own prefetch runs ahead), so the fewer and
// longer the calls, the better: Qwen3-30B-A3B INT4 decode, 2 threads, 8
// tasks per thread (48 KB calls) took 143 us for the down phase, 1 task per
// thread (384 KB) 100 us; against calls of at least 256 KiB (the rule
// before), alternated call by call in one process, ~82 GB/s state:
// DeepSeek-V2-Lite INT8 0.780 -> 0.754 ms per 1-token call, INT4 0.417 ->
// 0.408, Qwen3-30B-A3B INT8 0.566 -> 0.555 and 0.556 -> 0.544, INT4 equal,
// DeepSeek-V3 INT8 (24 experts) 4.92 -> 4.85; 4 tokens equal (~50 GB/s).
// Below this many (token, expert) pairs a call is decode-like: bound by
// memory, its tasks sized by bytes rather than by compute.
constexpr size_t kDecodeMaxPairs = 64;

uint32_t decode_down_blocks_per_task(size_t blocks, int threads) {
  const size_t th = size_t(std::max(1, threads));
  return even_blocks_per_task(blocks, th, th);
}

// Down tasks at prefill: two per thread. Each task runs every active
// expert over its blocks, reading the expert's encoded rows once per call
// and reusing them from cache across the call's blocks, so larger tasks
// read less (1024-token passes, 2 threads, task sizes alternated call by
// call in one process: Qwen3-30B-A3B INT8 47.2 ms per call at 4 blocks per
// task, 46.1 at 16, 44.1 at 32, 43.7 at 64; DeepSeek-V2-Lite INT8 64.2 at 4,
// 59.6 at 32; DeepSeek-V3 INT8 424 at 4, 384-387 at 56-224). Two rather
// than one per thread leaves the pool a little room to even out a thread
// that runs slow.
constexpr size_t kPrefillDownTasksPerThread = 2;

uint32_t prefill_down_blocks_per_task(size_t blocks, int threads) {
  const size_t th = size_t(std::max(1, threads));
  return even_blocks_per_task(blocks, kPrefillDownTasksPerThread * th, th);
}

// Splits `blocks` row blocks of work `rows_work` each into roughly
// `target_tasks` pieces, never smaller than `min_blocks`.
uint32_t blocks_per_task(size_t blocks, double work_per_block, double work_per_task, uint32_t min_blocks) {
  size_t per = size_t(std::ceil(work_per_task / std::max(1.0, work_per_block)));
  per = std::max<size_t>(per, min_blocks);
  return uint32_t(align_blocks(per, blocks));
}

}  // namespace

struct MoeLayer::Slice {
  uint32_t begin = 0, end = 0;  // columns of I
  PackedGeometry gate_geo, down_geo;
  AlignedBuffer gate, up, down;  // all experts, expert-major
  std::vector<PackedMatrixView> gate_views, up_views, down_views;
  uint32_t width() const { return end - begin; }
};

MoeLayer::MoeLayer(const MoeConfig& cfg, ThreadPool& pool) : cfg_(cfg), pool_(pool) {
  auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
  if (cfg.num_experts == 0) bad("num_experts must be positive");
  if (cfg.top_k == 0) bad("num_experts_per_tok must be positive");
  if (cfg.hidden == 0) bad("hidden_size must be positive");
  if (cfg.intermediate == 0) bad("moe_intermediate_size must be positive");
  // Limits first: everything below pads, slices and multiplies these sizes.
  if (cfg.num_experts > kMaxExperts)
    bad("num_experts must be at most " + std::to_string(kMaxExperts) + ", got " + std::to_string(cfg.num_experts));
  if (cfg.top_k > kMaxTopK)
    bad("num_experts_per_tok must be at most " + std::to_string(kMaxTopK) + ", got " + std::to_string(cfg.top_k));
  const uint64_t matrix_elements = uint64_t(cfg.hidden) * uint64_t(cfg.intermediate);  // < 2^64: two uint32
  if (matrix_elements > kMaxMatrixElements)
    bad("hidden_size x moe_intermediate_size must be at most " + std::to_string(kMaxMatrixElements) +
        " weights per expert matrix, got " + std::to_string(cfg.hidden) + " x " + std::to_string(cfg.intermediate) +
        " = " + std::to_string(matrix_elements));
  if (cfg.scheme == QuantScheme::kInt8Group && cfg.group_size == 0) bad("grouped INT8 needs group_size 32, 64 or 128");
  if (cfg.scheme == QuantScheme::kFP8Block && cfg.group_size == 0) bad("FP8 block needs group_size 32, 64 or 128 (checkpoints: 128)");
  if (scheme_has_groups(cfg.scheme) && cfg.group_size != 0) {
    const uint32_t g = cfg.group_size;
    if (g != 32 && g != 64 && g != 128) bad("group_size must be 32, 64 or 128 (or 0 for per channel), got " + std::to_string(g));
    if (cfg.hidden % g) bad("hidden_size (" + std::to_string(cfg.hidden) + ") must be a multiple of group_size " + std::to_string(g));
    if (cfg.intermediate % g)
      bad("moe_intermediate_size (" + std::to_string(cfg.intermediate) + ") must be a multiple of group_size " + std::to_string(g));
  } else if (!scheme_has_groups(cfg.scheme) && cfg.group_size != 0) {
    bad("group_size applies to INT4, grouped INT8 and FP8 formats only");
  }

  // The slice plan: units of kSliceAlign columns shared out as evenly as
  // they go, one slice per sub-pool while there are units for each. A layer
  // narrower than one unit per sub-pool gets fewer slices (an empty slice would
  // add a partial output that nothing writes); the sub-pools left without one
  // have no tasks of their own, and their threads help the others.
  const uint64_t units = (uint64_t(cfg.intermediate) + kSliceAlign - 1) / kSliceAlign;
  const uint64_t n = std::min<uint64_t>(uint64_t(std::max(1, pool.num_subpools())), units);
  uint64_t expert_bytes = 0;  // all slices' gate, up and down of one expert
  for (uint64_t s = 0; s < n; ++s) {
    auto sl = std::make_unique<Slice>();
    sl->begin = uint32_t(units * s / n * kSliceAlign);
    sl->end = uint32_t(std::min<uint64_t>(cfg.intermediate, units * (s + 1) / n * kSliceAlign));
    if (!packed_geometry(cfg.scheme, sl->width(), cfg.hidden, cfg.group_size, &sl->gate_geo) ||
        !packed_geometry(cfg.scheme, cfg.hidden, sl->width(), cfg.group_size, &sl->down_geo))
      bad("unsupported matrix geometry for this format");
    uint64_t slice_bytes = 0;
    if (__builtin_mul_overflow(uint64_t(sl->gate_geo.total_bytes), uint64_t(2), &slice_bytes) ||
        __builtin_add_overflow(slice_bytes, uint64_t(sl->down_geo.total_bytes), &slice_bytes) ||
        __builtin_add_overflow(expert_bytes, slice_bytes, &expert_bytes))
      bad("the packed size of one expert overflows 64 bits");
    slices_.push_back(std::move(sl));
  }
  // Every slice's arena holds all experts (allocate()); the layer's total must
  // be an addressable size, not a wrapped one.
  uint64_t layer_bytes = 0;
  if (__builtin_mul_overflow(expert_bytes, uint64_t(cfg.num_experts), &layer_bytes) ||
      layer_bytes > uint64_t(std::numeric_limits<std::ptrdiff_t>::max()))
    bad("the packed weights of num_experts=" + std::to_string(cfg.num_experts) + " experts of " +
        std::to_string(expert_bytes) + " bytes each exceed the address space");
  loaded_.assign(cfg.num_experts, 0);
}

MoeLayer::~MoeLayer() = default;

std::pair<uint32_t, uint32_t> MoeLayer::slice_range(int s) const {
  if (s < 0 || size_t(s) >= slices_.size())
    throw std::out_of_range("slice " + std::to_string(s) + " of a layer with " + std::to_string(slices_.size()) +
                            " slices");
  return {slices_[size_t(s)]->begin, slices_[size_t(s)]->end};
}

std::vector<size_t> MoeLayer::subpool_counts() const { return std::vector<size_t>(size_t(pool_.num_subpools()), 0); }

bool MoeLayer::slot_loaded(uint32_t slot) const { return slot < loaded_.size() && loaded_[slot]; }

size_t MoeLayer::packed_bytes() const {
  size_t total = 0;
  for (const auto& sl : slices_) total += 2 * sl->gate_geo.total_bytes + sl->down_geo.total_bytes;
  size_t loaded = 0;
  for (uint8_t l : loaded_) loaded += l;
  return total * loaded;
}

void MoeLayer::load_dense(const void* gate, const void* up, const void* down, DType dt, uint32_t num_logical,
                          const int64_t* slot_to_logical, const uint8_t* load_slot) {
  const uint32_t E = cfg_.num_experts, I = cfg_.intermediate, H = cfg_.hidden;
  if (!slot_to_logical && num_logical != E)
    throw std::invalid_argument("without a physical-to-logical map the weights need num_experts experts");
  std::vector<int64_t> logical(E);
  for (uint32_t s = 0; s < E; ++s) {
    logical[s] = slot_to_logical ? slot_to_logical[s] : int64_t(s);
    if (logical[s] < 0 || logical[s] >= int64_t(num_logical))
      throw std::invalid_argument("physical_to_logical_map[" + std::to_string(s) + "] = " + std::to_string(logical[s]) +
                                  " is outside [0, " + std::to_string(num_logical) + ")");
  }
  const size_t esize = dtype_size(dt);
  allocate();
  std::vector<size_t> counts = subpool_counts();
  for (size_t s = 0; s < slices_.size(); ++s) counts[s] = size_t(E) * 3;
  pool_.parallel_for_subpools(counts.data(), [&](int s, size_t task, int) {
    Slice& sl = *slices_[size_t(s)];
    const uint32_t e = uint32_t(task / 3);
    const int which = int(task % 3);
    if (load_slot && !load_slot[e]) return;
    const size_t lg = size_t(logical[e]);
    const uint8_t* g = static_cast<const uint8_t*>(gate) + lg * I * H * esize;
    const uint8_t* u = static_cast<const uint8_t*>(up) + lg * I * H * esize;
    const uint8_t* d = static_cast<const uint8_t*>(down) + lg * H * I * esize;
    if (which == 0)
      pack_matrix(cfg_.scheme, sl.gate_geo, g + size_t(sl.begin) * H * esize, dt, H, sl.gate.data() + e * sl.gate_geo.total_bytes);
    else if (which == 1)
      pack_matrix(cfg_.scheme, sl.gate_geo, u + size_t(sl.begin) * H * esize, dt, H, sl.up.data() + e * sl.gate_geo.total_bytes);
    else
      pack_matrix(cfg_.scheme, sl.down_geo, d, dt, I, sl.down.data() + e * sl.down_geo.total_bytes, sl.begin, I);
  });
  for (uint32_t e = 0; e < E; ++e) loaded_[e] = load_slot ? (load_slot[e] ? 1 : 0) : 1;
}

void MoeLayer::allocate() {
  const uint32_t E = cfg_.num_experts;
  // Every slice's arena; pages are first touched by the packing threads of
  // the slice's own sub-pool (never-loaded slots are never touched).
  for (auto& sl : slices_) {
    sl->gate = AlignedBuffer(sl->gate_geo.total_bytes * E);
    sl->up = AlignedBuffer(sl->gate_geo.total_bytes * E);
    sl->down = AlignedBuffer(sl->down_geo.total_bytes * E);
    sl->gate_views.resize(E);
    sl->up_views.resize(E);
    sl->down_views.resize(E);
    for (uint32_t e = 0; e < E; ++e) {
      sl->gate_views[e] = make_packed_view(cfg_.scheme, sl->gate_geo, sl->gate.data() + e * sl->gate_geo.total_bytes);
      sl->up_views[e] = make_packed_view(cfg_.scheme, sl->gate_geo, sl->up.data() + e * sl->gate_geo.total_bytes);
      sl->down_views[e] = make_packed_view(cfg_.scheme, sl->down_geo, sl->down.data() + e * sl->down_geo.total_bytes);
    }
  }
  loaded_.assign(E, 0);
}

template <typename Fn>
void MoeLayer::pack_expert_tasks(uint32_t slot, Fn&& fn) {
  if (slot >= cfg_.num_experts) throw std::invalid_argument("expert slot " + std::to_string(slot) + " is out of range");
  for (const auto& sl : slices_)
    if (sl->gate_views.size() != cfg_.num_experts)
      throw std::logic_error("MoeLayer::allocate() must be called before loading experts");
  // Tasks per slice: (matrix, chunk of row blocks), a few per thread.
  const int S = int(slices_.size());
  const size_t threads_per_slice = size_t(std::max(1, pool_.num_threads() / S));
  struct Chunk {
    int which;
    uint32_t b0, b1;
  };
  std::vector<std::vector<Chunk>> chunks(static_cast<size_t>(S));
  std::vector<size_t> counts = subpool_counts();
  for (int s = 0; s < S; ++s) {
    const Slice& sl = *slices_[size_t(s)];
    for (int which = 0; which < 3; ++which) {
      const uint32_t blocks = (which == 2 ? sl.down_geo.rows_padded : sl.gate_geo.rows_padded) / kRowBlock;
      const uint32_t per = uint32_t(std::max<size_t>(1, (blocks + 2 * threads_per_slice - 1) / (2 * threads_per_slice)));
      for (uint32_t b = 0; b < blocks; b += per) chunks[size_t(s)].push_back({which, b, std::min(blocks, b + per)});
    }
    counts[size_t(s)] = chunks[size_t(s)].size();
  }
  pool_.parallel_for_subpools(counts.data(), [&](int s, size_t task, int) {
    const Chunk& c = chunks[size_t(s)][task];
    fn(*slices_[size_t(s)], c.which, size_t(c.b0), size_t(c.b1));
  });
  loaded_[slot] = 1;
}

void MoeLayer::load_expert_quantized(uint32_t slot, const QuantizedMatrix& gate, const QuantizedMatrix& up,
                                     const QuantizedMatrix& down) {
  for (const QuantizedMatrix* m : {&gate, &up, &down}) {
    if (!m->q) throw std::invalid_argument("load_expert_quantized: missing codes");
    if (cfg_.scheme != QuantScheme::kBF16 && !m->scales) throw std::invalid_argument("load_expert_quantized: missing scales");
    if (cfg_.scheme == QuantScheme::kInt4Asym && !m->mins) throw std::invalid_argument("load_expert_quantized: missing mins");
  }
  const size_t elem = cfg_.scheme == QuantScheme::kBF16 ? 2 : 1;
  pack_expert_tasks(slot, [&](Slice& sl, int which, size_t b0, size_t b1) {
    const size_t off = size_t(slot);
    if (which == 2) {
      pack_quantized_blocks(cfg_.scheme, sl.down_geo, down.q, down.ld_q, down.scales, down.mins, down.scales_ld,
                            sl.down.data() + off * sl.down_geo.total_bytes, b0, b1, sl.begin);
      return;
    }
    // gate/up slice = rows [begin, end) of the canonical matrix.
    const QuantizedMatrix& m = which == 0 ? gate : up;
    const size_t row0 = sl.begin;
    const uint8_t* q = static_cast<const uint8_t*>(m.q) + row0 * m.ld_q * elem;
    const float* sc = m.scales ? m.scales + row0 * m.scales_ld : nullptr;
    const float* mn = m.mins ? m.mins + row0 * m.scales_ld : nullptr;
    AlignedBuffer& buf = which == 0 ? sl.gate : sl.up;
    pack_quantized_blocks(cfg_.scheme, sl.gate_geo, q, m.ld_q, sc, mn, m.scales_ld,
                          buf.data() + off * sl.gate_geo.total_bytes, b0, b1, 0);
  });
}

void MoeLayer::load_expert_dense(uint32_t slot, const void* gate, const void* up, const void* down, DType dt) {
  const uint32_t H = cfg_.hidden, I = cfg_.intermediate;
  const size_t esize = dtype_size(dt);
  if (!gate || !up || !down) throw std::invalid_argument("load_expert_dense: missing matrix");
  pack_expert_tasks(slot, [&](Slice& sl, int which, size_t b0, size_t b1) {
    const size_t off = size_t(slot);
    if (which == 2) {
      pack_matrix_blocks(cfg_.scheme, sl.down_geo, down, dt, I, sl.down.data() + off * sl.down_geo.total_bytes, b0, b1,
                         sl.begin, I);
      return;
    }
    const uint8_t* src = static_cast<const uint8_t*>(which == 0 ? gate : up) + size_t(sl.begin) * H * esize;
    AlignedBuffer& buf = which == 0 ? sl.gate : sl.up;
    pack_matrix_blocks(cfg_.scheme, sl.gate_geo, src, dt, H, buf.data() + off * sl.gate_geo.total_bytes, b0, b1);
  });
}

void MoeLayer::unpack_expert(uint32_t slot, int which, double* out) const {
  if (slot >= cfg_.num_experts || !loaded_[slot]) throw std::invalid_argument("expert slot is not loaded");
  if (which < 0 || which > 2) throw std::invalid_argument("which must be 0 (gate), 1 (up) or 2 (down)");
  const uint32_t I = cfg_.intermediate, H = cfg_.hidden;
  for (const auto& sl : slices_) {
    const PackedGeometry& geo = which == 2 ? sl->down_geo : sl->gate_geo;
    const AlignedBuffer& buf = which == 0 ? sl->gate : (which == 1 ? sl->up : sl->down);
    std::vector<double> part(size_t(geo.rows) * geo.cols);
    unpack_matrix(cfg_.scheme, geo, buf.data() + slot * geo.total_bytes, part.data());
    for (size_t r = 0; r < geo.rows; ++r)
      for (size_t c = 0; c < geo.cols; ++c) {
        if (which == 2)
          out[r * I + sl->begin + c] = part[r * geo.cols + c];
        else
          out[(sl->begin + r) * H + c] = part[r * geo.cols + c];
      }
  }
}

void MoeLayer::set_capture(bool on) {
  capture_on_ = on;
  if (!on) capture_.clear();
}

void MoeLayer::forward(const MoeForwardArgs& args) {
  const KernelTable& kt = current_kernels();
  const FormatKernels& fk = kernels_for(kt, cfg_.scheme);
  if (!fk.prepare_acts || !fk.gate_up || !fk.down)
    throw std::logic_error(std::string("backend ") + kt.name + " has no kernels for this format");
  std::lock_guard<std::mutex> lock(scratch().mutex);
  if (capture_on_) capture_.assign(args.tokens * cfg_.top_k * cfg_.intermediate, std::numeric_limits<float>::quiet_NaN());
  // One pass of 2048 tokens instead of two of 1024 gives each expert of a
  // 128-expert top-8 layer ~128 rows instead of ~64 (Qwen3-30B-A3B INT8, 2
  // threads, alternated call by call in one process: 87.3 -> 85.3 ms).
  const size_t per_pass = tokens_per_pass(cfg_, slices_.size(), args.tokens);
  for (size_t t0 = 0; t0 < args.tokens; t0 += per_pass)
    forward_pass(args, t0, std::min(per_pass, args.tokens - t0), kt);
  note_backend_used(kt);
}

void MoeLayer::forward_pass(const MoeForwardArgs& args, size_t t0, size_t T, const KernelTable& kt) {
  const FormatKernels& fk = kernels_for(kt, cfg_.scheme);
  const QuantScheme scheme = cfg_.scheme;
  const uint32_t H = cfg_.hidden, I = cfg_.intermediate, K = cfg_.top_k;
  const int S = int(slices_.size());
  const int threads = pool_.num_threads();
  Scratch& sc = scratch();
  Routing& rt = sc.routing;

  PhaseClock clock(sc.phases);
  // 1. Routing (reads ids and weights once; nothing else reads them later).
  const int64_t missing = build_routing(args, t0, T, cfg_.num_experts, K, loaded_.data(), &rt);
  if (missing >= 0)
    throw std::runtime_error("expert " + std::to_string(missing) +
                             " is routed to the CPU but its weights were not loaded (it was marked as GPU-resident at load time)");
  const size_t P = rt.pairs;

  clock.mark(kPhaseRouting);
  // 2. x -> fp32 -> format encoding; zero the slices' partial outputs. Each
  // thread widens kEncodeRows rows at a time into its own few KiB of xf and
  // encodes them from L1/L2 (widening a task's 256 rows at once sent 2 MiB
  // of fp32 through L3: Qwen3-30B-A3B at 2048 tokens, one core, 1.13 ->
  // 1.00 ms, before the bf16 kernels).
  constexpr size_t kEncodeRows = 8;
  const size_t ldy = H;
  sc.xf.ensure(size_t(threads) * kEncodeRows * H * sizeof(float));
  sc.y.ensure(size_t(S) * T * ldy * sizeof(float));
  sc.qx.reserve(scheme, T, H);
  float* xf = reinterpret_cast<float*>(sc.xf.data());
  float* ybuf = reinterpret_cast<float*>(sc.y.data());
  const size_t rows_per_task = std::max<size_t>(1, (T + size_t(threads) * 4 - 1) / (size_t(threads) * 4));
  const size_t row_tasks = (T + rows_per_task - 1) / rows_per_task;
  pool_.parallel_for(row_tasks, [&](size_t task, int thread) {
    float* xt = xf + size_t(thread) * kEncodeRows * H;
    const size_t task_end = std::min(T, (task + 1) * rows_per_task);
    for (size_t r0 = task * rows_per_task; r0 < task_end; r0 += kEncodeRows) {
      const size_t r1 = std::min(task_end, r0 + kEncodeRows);
      for (size_t t = r0; t < r1; ++t) {
        row_to_f32(static_cast<const uint8_t*>(args.x) + (t0 + t) * args.x_stride * dtype_size(args.x_dtype),
                   args.x_dtype, H, xt + (t - r0) * H, kt.convert);
        // With pairs to compute, each down task zeroes its own columns instead
        // (below), so the lines it adds into start in its own core's cache.
        if (P == 0)
          for (int s = 0; s < S; ++s) std::memset(ybuf + (size_t(s) * T + t) * ldy, 0, H * sizeof(float));
      }
      fk.prepare_acts(xt, r1 - r0, H, H, sc.qx.from_row(r0));
    }
  });

  clock.mark(kPhaseEncodeX);
  if (P > 0) {
    // 3. gate/up: tasks sized so that every thread gets several, large experts first.
    const size_t ldh = I;
    sc.h.ensure(P * ldh * sizeof(float));
    float* h = reinterpret_cast<float*>(sc.h.data());
    sc.hq.reserve(scheme, P, I);
    sc.rows_to_encode.clear();
    sc.gate_up_tasks.resize(size_t(S));
    std::vector<size_t>& counts = sc.task_counts;
    counts.assign(size_t(pool_.num_subpools()), 0);  // sub-pools past the last slice: none of their own
    for (int s = 0; s < S; ++s) {
      auto& tasks = sc.gate_up_tasks[size_t(s)];
      tasks.clear();
      const Slice& sl = *slices_[size_t(s)];
      const size_t blocks = sl.gate_geo.rows_padded / kRowBlock;
      const double total = double(P) * double(blocks);
      const int slice_threads = std::max(1, threads / S);
      const double per_task = total / (8.0 * slice_threads);
      for (int32_t e : rt.active) {
        const size_t c = size_t(rt.count[size_t(e)]);
        const uint32_t per = blocks_per_task(blocks, double(c), per_task, c >= 16 ? 4 : 1);
        // A row's encoding needs its whole width (one amax per row), so only
        // a task spanning every block of the only slice can encode it. At
        // prefill that is the rule (each expert one task): the rows are
        // encoded from cache instead of being written out and read back from
        // memory by a separate step.
        const bool whole = S == 1 && per >= blocks;
        // Listed once, not once per slice: two encode tasks over the same rows
        // would rewrite each other's codes in place (a data race, wrong rows).
        if (!whole && s == 0) sc.rows_to_encode.push_back({size_t(rt.offset[size_t(e)]), c});
        for (uint32_t b = 0; b < blocks; b += per)
          tasks.push_back({uint32_t(e), b, uint32_t(std::min<size_t>(blocks, b + per)), whole});
      }
      counts[size_t(s)] = tasks.size();
    }
    pool_.parallel_for_subpools(counts.data(), [&](int s, size_t i, int) {
      const Slice& sl = *slices_[size_t(s)];
      const GateUpTask& tk = sc.gate_up_tasks[size_t(s)][i];
      const size_t off = size_t(rt.offset[tk.expert]);
      const ActsView a = sc.qx.view(scheme, 0, size_t(rt.count[tk.expert]), 0, rt.pair_token.data() + off);
      fk.gate_up(sl.gate_views[tk.expert], sl.up_views[tk.expert], tk.block_begin, tk.block_end, a, cfg_.activation,
                 h + off * ldh + sl.begin, ldh);
      if (tk.encodes_rows) fk.prepare_acts(h + off * ldh, a.rows, I, ldh, sc.hq.from_row(off));
    });
    if (capture_on_)
      for (size_t p = 0; p < P; ++p)
        std::memcpy(&capture_[(t0 * K + size_t(rt.pair_slot[p])) * I], h + p * ldh, I * sizeof(float));

    clock.mark(kPhaseGateUp);
    // 4. Encode the rows of the intermediate that the gate/up tasks left
    // (experts split over several tasks or slices), a few tasks per thread.
    size_t left = 0;
    for (const RowRange& r : sc.rows_to_encode) left += r.rows;
    const size_t rows_per_encode = std::max<size_t>(1, (left + size_t(threads) * 4 - 1) / (size_t(threads) * 4));
    sc.encode_tasks.clear();
    for (const RowRange& r : sc.rows_to_encode)
      for (size_t p = 0; p < r.rows; p += rows_per_encode)
        sc.encode_tasks.push_back({r.row0 + p, std::min(rows_per_encode, r.rows - p)});
    pool_.parallel_for(sc.encode_tasks.size(), [&](size_t task, int) {
      const RowRange& r = sc.encode_tasks[task];
      fk.prepare_acts(h + r.row0 * ldh, r.rows, I, ldh, sc.hq.from_row(r.row0));
    });

    clock.mark(kPhaseEncodeH);
    // 5. down + weighted combine into each slice's partial output.
    sc.out_rows.resize(size_t(S) * P);
    for (int s = 0; s < S; ++s)
      for (size_t p = 0; p < P; ++p)
        sc.out_rows[size_t(s) * P + p] = ybuf + (size_t(s) * T + size_t(rt.pair_token[p])) * ldy;
    sc.down_tasks.resize(size_t(S));
    const size_t hblocks = (H + kRowBlock - 1) / kRowBlock;
    for (int s = 0; s < S; ++s) {
      auto& tasks = sc.down_tasks[size_t(s)];
      tasks.clear();
      const int slice_threads = std::max(1, threads / S);
      const uint32_t per = P >= kDecodeMaxPairs
                               ? prefill_down_blocks_per_task(hblocks, slice_threads)
                               : decode_down_blocks_per_task(hblocks, slice_threads);
      for (uint32_t b = 0; b < hblocks; b += per) tasks.push_back({b, uint32_t(std::min<size_t>(hblocks, b + per))});
      counts[size_t(s)] = tasks.size();
    }
    pool_.parallel_for_subpools(counts.data(), [&](int s, size_t i, int) {
      const Slice& sl = *slices_[size_t(s)];
      const DownTask& tk = sc.down_tasks[size_t(s)][i];
      const size_t c0 = size_t(tk.block_begin) * kRowBlock, c1 = std::min<size_t>(H, size_t(tk.block_end) * kRowBlock);
      for (size_t t = 0; t < T; ++t) std::memset(ybuf + (size_t(s) * T + t) * ldy + c0, 0, (c1 - c0) * sizeof(float));
      const std::vector<int32_t>& experts = rt.active_by_id;
      for (size_t k = 0; k < experts.size(); ++k) {
        const size_t e = size_t(experts[k]);
        const size_t off = size_t(rt.offset[e]);
        const ActsView a = sc.hq.view(scheme, off, size_t(rt.count[e]), sl.begin, nullptr);
        // The next expert's blocks are warmed while this one finishes
        // (prefill: its first token tile would otherwise read them from DRAM).
        PackedMatrixView w = sl.down_views[e];
        if (k + 1 < experts.size()) w.next_weights = sl.down_views[size_t(experts[k + 1])].weights;
        fk.down(w, tk.block_begin, tk.block_end, a, rt.pair_weight.data() + off, sc.out_rows.data() + size_t(s) * P + off);
      }
    });
  }

  clock.mark(kPhaseDown);
  // 6. Sum slices, convert to the caller's dtype.
  pool_.parallel_for(row_tasks, [&](size_t task, int) {
    const size_t r0 = task * rows_per_task, r1 = std::min(T, r0 + rows_per_task);
    for (size_t t = r0; t < r1; ++t) {
      float* y0 = ybuf + t * ldy;
      for (int s = 1; s < S; ++s) {
        const float* ys = ybuf + (size_t(s) * T + t) * ldy;
        for (size_t c = 0; c < H; ++c) y0[c] += ys[c];
      }
      row_from_f32(y0, H, static_cast<uint8_t*>(args.y) + (t0 + t) * args.y_stride * dtype_size(args.y_dtype), args.y_dtype,
                   kt.convert);
    }
  });
  clock.mark(kPhaseCombine);
  ++sc.phases.passes;
}

LayerPhaseTimes layer_phase_times(bool reset) {
  Scratch& sc = scratch();
  std::lock_guard<std::mutex> lock(sc.mutex);
  const LayerPhaseTimes t = sc.phases;
  if (reset) sc.phases = LayerPhaseTimes();
  return t;
}

}  // namespace kt
