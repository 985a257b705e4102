// Declarations of the AVX-512 backend's kernels, for its table filler
// (kernel_table_avx512.cpp) only. Each has the signature of its FormatKernels
// slot and the semantics of its scalar twin in src/reference/.
#pragma once

#include <cstddef>

#include "kt_kernel/kernel_table.h"

namespace kt {
namespace avx512 {

// Activation encodings (buffers sized by acts_row_bytes / acts_group_sums_per_row).
void prepare_acts_bf16__avx512(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out);
void prepare_acts_u8__avx512(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out);
void prepare_acts_s8_sums__avx512(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out);
// RowConvertKernels (AVX-512 F/BW).
void bf16_to_f32_row__avx512(const uint16_t* src, size_t n, float* dst);
void f32_to_bf16_row__avx512(const float* src, size_t n, uint16_t* dst);

// INT8 weights x u8 (q + 128) activations.
void gate_up_q8w_u8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                             size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
void down_q8w_u8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                          const float* row_weight, float* const* out_rows);
// INT8 grouped weights (scale and compensation per row and group) x u8 activations.
void gate_up_q8gw_u8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                              size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
void down_q8gw_u8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                           const float* row_weight, float* const* out_rows);

// FP8 e4m3 block-scaled weights (decoded on the fly) x bf16 activations (AVX512-BF16).
void gate_up_fp8w_bf16a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                size_t ldh);
void down_fp8w_bf16a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                             const float* row_weight, float* const* out_rows);

// INT4 weights (symmetric / with mins) x s8 activations.
void gate_up_q4w_s8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                             size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
void down_q4w_s8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                          const float* row_weight, float* const* out_rows);
void gate_up_q4mw_s8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                              size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
void down_q4mw_s8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                           const float* row_weight, float* const* out_rows);

// BF16 weights x BF16 activations (AVX512-BF16 only).
void gate_up_bf16w_bf16a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                 size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                 size_t ldh);
void down_bf16w_bf16a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                              const float* row_weight, float* const* out_rows);

}  // namespace avx512
}  // namespace kt
