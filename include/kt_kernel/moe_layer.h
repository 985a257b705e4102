// The MoE layer: routed experts of one transformer layer, computed on the CPU.
//
//   y[t] = sum_j w[t, j] * down_e( act(gate_e(x[t]), up_e(x[t])) ),  e = ids[t, j]
//
// over the pairs (t, j) whose expert id is in [0, num_experts) and not
// marked in the skip mask (experts living on the GPU). Rows with no CPU
// expert are zero. Weights are packed once per NUMA sub-pool slice of the
// intermediate dimension (see DESIGN.md "MoE execution").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kt_kernel/kernel_table.h"
#include "kt_kernel/packed_matrix.h"
#include "kt_kernel/types.h"

namespace kt {

class ThreadPool;

// The largest layer the MoeLayer constructor accepts, checked before any size
// arithmetic (a dimension near 2^32 would wrap the uint32 padding and slice
// sums to a zero-sized layer). Far above any released model (at most a few
// hundred routed experts, top-k at most a few dozen, one expert matrix at most
// ~2^28 weights), and small enough that every padded width, byte count and
// 32-bit element index of one expert matrix stays exact: 2^30 weights of 2
// bytes plus their scales fit in uint32 byte counts.
constexpr uint32_t kMaxExperts = 1u << 16;
constexpr uint32_t kMaxTopK = kMaxExperts;
constexpr uint64_t kMaxMatrixElements = uint64_t(1) << 30;  // hidden x intermediate

struct MoeConfig {
  uint32_t num_experts = 0;   // expert slots that ids index
  uint32_t top_k = 0;
  uint32_t hidden = 0;        // H
  uint32_t intermediate = 0;  // I, un-sharded
  QuantScheme scheme = QuantScheme::kBF16;
  uint32_t group_size = 0;    // INT4: K per scale group (0 = per channel)
  ActivationParams activation;
};

// Which of a token's CPU pairs a call computes (expert deferral,
// INTERFACE.md): with d = deferred_per_token, the d lowest-weight CPU pairs of
// each token (ties: the later k position first) are "deferred".
enum class PairFilter : int32_t { kAll = 0, kMainOnly = 1, kDeferredOnly = 2 };

// Inputs of one forward call; all pointers are the caller's, read during
// the call only. Strides are in elements.
struct MoeForwardArgs {
  size_t tokens = 0;
  const void* x = nullptr;           // [tokens][hidden]
  DType x_dtype = DType::kF32;
  size_t x_stride = 0;
  const void* ids = nullptr;         // [tokens][top_k], int32 or int64
  bool ids_int64 = false;
  size_t ids_stride = 0;
  const void* weights = nullptr;     // [tokens][top_k]
  DType weights_dtype = DType::kF32;
  size_t weights_stride = 0;
  const uint8_t* skip_mask = nullptr;  // [num_experts], nonzero = skip (on GPU); may be null
  void* y = nullptr;                 // [tokens][hidden], written completely
  DType y_dtype = DType::kF32;
  size_t y_stride = 0;
  PairFilter pair_filter = PairFilter::kAll;  // kAll ignores deferred_per_token
  uint32_t deferred_per_token = 0;
};

class MoeLayer {
 public:
  // The layer is split into at most pool.num_subpools() slices of the
  // intermediate dimension, each packed in the memory of its sub-pool's
  // threads. Throws std::invalid_argument for an invalid configuration (the
  // message names the argument), limits above included.
  MoeLayer(const MoeConfig& cfg, ThreadPool& pool);
  ~MoeLayer();

  const MoeConfig& config() const { return cfg_; }

  // Quantises and packs all experts from dense row-major weights:
  // gate, up [num_logical][I][H], down [num_logical][H][I], of type dt.
  // Slot s takes logical expert slot_to_logical[s] (nullptr = identity, which
  // needs num_logical == num_experts). Slots with load_slot[s] == 0 are left
  // unloaded (nullptr = load all).
  void load_dense(const void* gate, const void* up, const void* down, DType dt, uint32_t num_logical,
                  const int64_t* slot_to_logical, const uint8_t* load_slot);

  // Per-expert loading (converted files, checkpoints read expert by expert):
  // allocate() reserves every slice's arena and marks all slots unloaded
  // (pages are placed later, by the first writer); then each
  // load_expert_* packs one slot's three matrices, every slice by the
  // threads of its own sub-pool. Slots never loaded stay unloaded (forward
  // then raises if one is routed to the CPU).
  void allocate();
  // Already-quantised canonical matrices (pack.h "Canonical quantised
  // form"): gate and up [I][H], down [H][I], full (un-sliced) matrices.
  struct QuantizedMatrix {
    const void* q = nullptr;
    size_t ld_q = 0;  // elements (bytes for INT4) per row
    const float* scales = nullptr;
    const float* mins = nullptr;
    size_t scales_ld = 0;
  };
  void load_expert_quantized(uint32_t slot, const QuantizedMatrix& gate, const QuantizedMatrix& up,
                             const QuantizedMatrix& down);
  // Dense row-major matrices of one expert: gate, up [I][H], down [H][I].
  void load_expert_dense(uint32_t slot, const void* gate, const void* up, const void* down, DType dt);

  bool slot_loaded(uint32_t slot) const;

  // Runs the layer. Throws std::runtime_error if an unloaded expert is routed
  // to the CPU (before any output is written).
  void forward(const MoeForwardArgs& args);

  // Bytes of packed weights held in memory (all slices, all experts).
  size_t packed_bytes() const;

  // Exact float64 values of one expert's matrix (0 gate, 1 up, 2 down),
  // reassembled across slices: [I][H] for gate/up, [H][I] for down.
  void unpack_expert(uint32_t slot, int which, double* out) const;

  // Test hook: when on, forward keeps the fp32 intermediate act(gate, up)
  // of every pair, [tokens * top_k][I] indexed t * top_k + j (NaN where the
  // pair was skipped), for the last call.
  void set_capture(bool on);
  const std::vector<float>& captured_intermediate() const { return capture_; }

  // Slices of the intermediate dimension: one per sub-pool, but never one
  // without columns (slices start on multiples of 128 columns, so a narrow
  // layer has fewer slices than sub-pools; slice s runs on sub-pool s).
  int num_slices() const { return int(slices_.size()); }
  // Column range [begin, end) of the intermediate dimension owned by slice s
  // (std::out_of_range unless 0 <= s < num_slices()).
  std::pair<uint32_t, uint32_t> slice_range(int s) const;

 private:
  struct Slice;
  // Runs fn(slice, which matrix, block_begin, block_end) over every slice's
  // gate/up/down row blocks on that slice's sub-pool.
  template <typename Fn>
  void pack_expert_tasks(uint32_t slot, Fn&& fn);
  void forward_pass(const MoeForwardArgs& args, size_t t0, size_t tokens, const KernelTable& kt);
  // Zeros, one per sub-pool: the task counts of parallel_for_subpools, which
  // reads one for every sub-pool, slice or not.
  std::vector<size_t> subpool_counts() const;

  MoeConfig cfg_;
  ThreadPool& pool_;
  std::vector<std::unique_ptr<Slice>> slices_;
  std::vector<uint8_t> loaded_;
  bool capture_on_ = false;
  std::vector<float> capture_;
};

// Wall time of each step of a layer pass (moe_layer.cpp's steps 1-6),
// summed over every pass of every layer since the last reset: where a call's
// time goes (routing, encoding x, gate/up, encoding the intermediate, down,
// combine). Always on: six clock reads per pass.
enum LayerPhase { kPhaseRouting, kPhaseEncodeX, kPhaseGateUp, kPhaseEncodeH, kPhaseDown, kPhaseCombine, kNumPhases };
struct LayerPhaseTimes {
  double seconds[kNumPhases] = {};
  uint64_t passes = 0;
};
// The totals so far; with reset, also starts them again from zero.
LayerPhaseTimes layer_phase_times(bool reset);

}  // namespace kt
