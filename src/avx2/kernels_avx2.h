// Entry points of the AVX2 backend, one per (operation, format, dot-product
// instruction), and the table filler with its VNNI switch. Signatures are
// those of FormatKernels (kernel_table.h); semantics are the scalar twins' in
// src/reference/kernels_reference.cpp. The __avxvnni variants are compiled
// with __attribute__((target("avxvnni"))) and may only run where
// CpuFeatures::avx_vnni is true. Everything here needs AVX2, FMA and F16C.
#pragma once

#include <cstddef>

#include "kt_kernel/kernel_table.h"

namespace kt {
namespace avx2 {

// x [rows][ldx] fp32, k valid columns -> out: rows of acts_row_bytes(s, k)
// bytes (padding = the encoding of 0), plus scales / group sums per format.
using PrepareActsKernel = void(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out);
using GateUpKernel = void(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                          size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh);
using DownKernel = void(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                        const float* row_weight, float* const* out_rows);

PrepareActsKernel prepare_acts_bf16__avx2;
PrepareActsKernel prepare_acts_u8__avx2;       // INT8: u8 = q + 128
PrepareActsKernel prepare_acts_s8_sums__avx2;  // INT4: s8 = q, int32 sums per 32 k

// RowConvertKernels.
void bf16_to_f32_row__avx2(const uint16_t* src, size_t n, float* dst);
void f32_to_bf16_row__avx2(const float* src, size_t n, uint16_t* dst);

GateUpKernel gate_up_bf16w_bf16a__avx2;
DownKernel down_bf16w_bf16a__avx2;

GateUpKernel gate_up_q8w_u8a__avx2;
DownKernel down_q8w_u8a__avx2;
GateUpKernel gate_up_q8w_u8a__avxvnni;
DownKernel down_q8w_u8a__avxvnni;

GateUpKernel gate_up_q4w_sym_s8a__avx2;
DownKernel down_q4w_sym_s8a__avx2;
GateUpKernel gate_up_q4w_asym_s8a__avx2;
DownKernel down_q4w_asym_s8a__avx2;
GateUpKernel gate_up_q4w_sym_s8a__avxvnni;
DownKernel down_q4w_sym_s8a__avxvnni;
GateUpKernel gate_up_q4w_asym_s8a__avxvnni;
DownKernel down_q4w_asym_s8a__avxvnni;

// Fills every format of t with this backend's kernels; the integer formats
// use the AVX-VNNI variants when use_vnni is true (only where the CPU has
// AVX-VNNI). fill_kernels_avx2 passes CpuFeatures::avx_vnni; tests call it
// with false to cover the maddubs path on VNNI machines too.
void fill_table(KernelTable* t, bool use_vnni);

}  // namespace avx2
}  // namespace kt
