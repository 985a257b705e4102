// Declarations of the AMX tile kernels, for the table filler
// (kernel_table_amx.cpp) only. The same source is compiled twice, into
// kt::amx_hw (real tiles) and kt::amx_emu (emulated tiles); each function has
// the signature of its FormatKernels slot and the semantics of its scalar
// twin in src/reference/ (integer formats bit for bit in the emulated build).
//
// The kernels use tiles for every token count; the "amx" filler decides when
// to hand small token counts to the AVX-512 kernels instead.
#pragma once

#include <cstddef>

#include "amx/tile.h"
#include "kt_kernel/kernel_table.h"

namespace kt {
namespace KT_AMX_NS {

// INT8 weights x u8 (q + 128) activations: tdpbusd.
void gate_up_q8w_u8a__amx(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                          size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
void down_q8w_u8a__amx(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                       const float* row_weight, float* const* out_rows);

// INT4 weights (u4, symmetric or with mins; per channel or per group of
// 32/64/128) x s8 activations with per-32 sums: tdpbsud per group.
void gate_up_q4w_s8a__amx(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                          size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
void down_q4w_s8a__amx(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                       const float* row_weight, float* const* out_rows);

// BF16 weights x BF16 activations: tdpbf16ps, fp32 accumulation.
void gate_up_bf16w_bf16a__amx(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                              size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
void down_bf16w_bf16a__amx(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                           const float* row_weight, float* const* out_rows);

#ifdef KT_AMX_EMULATE
// Activation encodings for the emulated build (the scalar contract of
// kernel_table.h; the real build uses the AVX-512 ones).
void prepare_acts_bf16__amx_emu(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out);
void prepare_acts_u8__amx_emu(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out);
void prepare_acts_s8_sums__amx_emu(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out);
#endif

}  // namespace KT_AMX_NS
}  // namespace kt
