// The table of kernels one backend provides, and the activation encodings
// they consume. Orchestration (src/moe/) calls only through this table, so it
// never names an instruction set. Every backend's entries have the same
// signature as the scalar reference twins in src/reference/.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kt_kernel/packed_matrix.h"

namespace kt {

// Activation rows in the encoding a format's kernels read:
//   BF16, FP8: data = bf16 [rows][k_padded]                   (row_scale, group_sums unused)
//   INT8:  data = u8 = q + 128 [rows][k_padded], q = round(x / row_scale) in [-127, 127]
//   INT4:  data = s8 = q [rows][k_padded];  group_sums[r][j] = sum of q over k in [32j, 32j+32)
// A row holding Inf or NaN has row_scale NaN (its codes: finite -> 0, else
// 127), so everything computed from it is NaN.
// Padding columns hold the encoding of 0. A view may start at a column
// offset (a NUMA slice of K) by advancing data and group_sums together.
struct ActsView {
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;                // stride between rows of data
  const float* row_scale = nullptr;    // INT8 / INT4: per row
  const int32_t* group_sums = nullptr; // INT4: per row, per 32 k
  size_t group_sums_stride = 0;        // int32 elements between rows of group_sums
  const int32_t* row_index = nullptr;  // row m of the view is row row_index[m]; nullptr = identity
  size_t rows = 0;
};

// Writable buffers for prepare_acts; sized by acts_row_bytes / acts_group_sums_per_row.
struct ActsBuffer {
  uint8_t* data = nullptr;
  size_t row_bytes = 0;
  float* row_scale = nullptr;
  int32_t* group_sums = nullptr;
  size_t group_sums_stride = 0;
};

static inline size_t acts_row_bytes(QuantScheme s, size_t k) {
  return round_up(k, kColPad) * (scheme_bf16_acts(s) ? 2 : 1);
}
static inline size_t acts_group_sums_per_row(QuantScheme s, size_t k) {
  return scheme_is_int4(s) ? round_up(k, kColPad) / kActSumGroup : 0;
}

// The gated activation applied to (gate, up) in the gate/up epilogue.
//   limit == 0:  h = silu(gate) * up                          (standard SwiGLU)
//   limit  > 0:  g = min(gate, limit), u = clamp(up, -limit, limit),
//                h = g * sigmoid(alpha * g) * (u + 1)          (GPT-OSS "swigluoai")
struct ActivationParams {
  float swiglu_limit = 0.0f;
  float swiglu_alpha = 0.0f;
};

struct FormatKernels {
  // x: fp32 rows [rows][ldx], k valid columns -> this format's encoding.
  void (*prepare_acts)(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) = nullptr;

  // For row blocks [block_begin, block_end) of gate and up (same geometry):
  // h[m * ldh + n] = act(gate_n . a_m, up_n . a_m), for the rows n < geo.rows
  // of those blocks and m < a.rows. Columns of h outside the range are not touched.
  void (*gate_up)(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin, size_t block_end,
                  const ActsView& a, const ActivationParams& act, float* h, size_t ldh) = nullptr;

  // For row blocks [block_begin, block_end) of w:
  // out_rows[m][n] += row_weight[m] * (w_n . a_m), for rows n < geo.rows of those blocks.
  void (*down)(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
               const float* row_weight, float* const* out_rows) = nullptr;
};

// The caller's bf16 rows to fp32 (x, before its encoding) and the fp32 layer
// output back to bf16 (y), n values each: widening is exact, narrowing
// rounds to nearest even and keeps a NaN a quiet NaN (types.h f32_to_bf16).
// Bit-identical in every backend. Other dtypes convert in baseline code.
struct RowConvertKernels {
  void (*bf16_to_f32)(const uint16_t* src, size_t n, float* dst) = nullptr;
  void (*f32_to_bf16)(const float* src, size_t n, uint16_t* dst) = nullptr;
};

struct KernelTable {
  const char* name = nullptr;  // "scalar", "avx2", "avx512", "amx", "amx-emu"
  FormatKernels formats[kNumSchemes];
  RowConvertKernels convert;
};

static inline const FormatKernels& kernels_for(const KernelTable& t, QuantScheme s) {
  return t.formats[static_cast<int>(s)];
}

struct CpuFeatures;

// Each backend's folder exports a filler; it fills only the formats it
// implements on this CPU and leaves the rest null (the dispatcher then
// borrows the next backend's entry, so a table is always complete). Fillers
// only read the bool fields of CpuFeatures: ISA folders must not instantiate
// any inline or template code shared with baseline code (see types.h).
void fill_kernels_scalar(KernelTable* t, const CpuFeatures& cpu);
void fill_kernels_avx2(KernelTable* t, const CpuFeatures& cpu);
void fill_kernels_avx512(KernelTable* t, const CpuFeatures& cpu);
void fill_kernels_amx(KernelTable* t, const CpuFeatures& cpu);
void fill_kernels_amx_emu(KernelTable* t, const CpuFeatures& cpu);

}  // namespace kt
