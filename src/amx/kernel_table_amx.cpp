// Registers the AMX kernels. This folder is compiled twice: with AMX flags
// (backend "amx") and at baseline flags over the tile emulation
// (KT_AMX_EMULATE, backend "amx-emu"); each build exports its own filler.
//
// "amx-emu" registers the tile kernels for every format and every token
// count, so the tests exercise the tile code at small sizes. "amx" uses the
// tiles from kAmxMinTokens activation rows on and the AVX-512 kernels below
// that: a tile pass always computes 16 or 32 rows, so a few tokens waste most
// of it, and decode is bandwidth bound anyway.
#include "amx/kernels_amx.h"
#include "kt_kernel/cpu_features.h"
#include "kt_kernel/kernel_table.h"

#ifndef KT_AMX_EMULATE
#include "avx512/kernels_avx512.h"
#endif

namespace kt {

#ifdef KT_AMX_EMULATE

void fill_kernels_amx_emu(KernelTable* t, const CpuFeatures&) {
  FormatKernels& i8 = t->formats[int(QuantScheme::kInt8PerChannel)];
  i8.prepare_acts = amx_emu::prepare_acts_u8__amx_emu;
  i8.gate_up = amx_emu::gate_up_q8w_u8a__amx;
  i8.down = amx_emu::down_q8w_u8a__amx;

  for (QuantScheme s : {QuantScheme::kInt4Sym, QuantScheme::kInt4Asym}) {
    FormatKernels& i4 = t->formats[int(s)];
    i4.prepare_acts = amx_emu::prepare_acts_s8_sums__amx_emu;
    i4.gate_up = amx_emu::gate_up_q4w_s8a__amx;
    i4.down = amx_emu::down_q4w_s8a__amx;
  }

  FormatKernels& bf = t->formats[int(QuantScheme::kBF16)];
  bf.prepare_acts = amx_emu::prepare_acts_bf16__amx_emu;
  bf.gate_up = amx_emu::gate_up_bf16w_bf16a__amx;
  bf.down = amx_emu::down_bf16w_bf16a__amx;
}

#else

namespace amx_hw {
namespace {

// Activation rows from which the tile kernels beat the AVX-512 ones. A
// first estimate, to be tuned on AMX hardware: a tile pass computes 16 rows
// whatever the count, and below ~8 rows per expert the AVX-512 GEMV (which
// streams the weights once at memory speed) loses nothing to it.
constexpr size_t kAmxMinTokens = 8;

using GateUpFn = decltype(FormatKernels::gate_up);
using DownFn = decltype(FormatKernels::down);

// One threshold wrapper per (tile kernel, AVX-512 kernel) pair: tiles from
// kAmxMinTokens rows per expert, the AVX-512 GEMV/GEMM below. Instances live
// in this anonymous namespace (internal linkage: no weak symbols).
template <GateUpFn kTiles, GateUpFn kVector>
void gate_up_auto(const PackedMatrixView& gate, const PackedMatrixView& up, size_t bb, size_t be, const ActsView& a,
                  const ActivationParams& act, float* h, size_t ldh) {
  (a.rows >= kAmxMinTokens ? kTiles : kVector)(gate, up, bb, be, a, act, h, ldh);
}

template <DownFn kTiles, DownFn kVector>
void down_auto(const PackedMatrixView& w, size_t bb, size_t be, const ActsView& a, const float* row_weight,
               float* const* out_rows) {
  (a.rows >= kAmxMinTokens ? kTiles : kVector)(w, bb, be, a, row_weight, out_rows);
}

}  // namespace
}  // namespace amx_hw

// The dispatcher calls this only where CPUID, the OS and the Linux permission
// allow AMX-TILE/INT8/BF16 and the AVX-512 backend's instructions exist.
void fill_kernels_amx(KernelTable* t, const CpuFeatures& cpu) {
  FormatKernels& i8 = t->formats[int(QuantScheme::kInt8PerChannel)];
  i8.prepare_acts = avx512::prepare_acts_u8__avx512;
  i8.gate_up = amx_hw::gate_up_auto<amx_hw::gate_up_q8w_u8a__amx, avx512::gate_up_q8w_u8a__avx512>;
  i8.down = amx_hw::down_auto<amx_hw::down_q8w_u8a__amx, avx512::down_q8w_u8a__avx512>;

  FormatKernels& i4 = t->formats[int(QuantScheme::kInt4Sym)];
  i4.prepare_acts = avx512::prepare_acts_s8_sums__avx512;
  i4.gate_up = amx_hw::gate_up_auto<amx_hw::gate_up_q4w_s8a__amx, avx512::gate_up_q4w_s8a__avx512>;
  i4.down = amx_hw::down_auto<amx_hw::down_q4w_s8a__amx, avx512::down_q4w_s8a__avx512>;

  FormatKernels& i4m = t->formats[int(QuantScheme::kInt4Asym)];
  i4m.prepare_acts = avx512::prepare_acts_s8_sums__avx512;
  i4m.gate_up = amx_hw::gate_up_auto<amx_hw::gate_up_q4w_s8a__amx, avx512::gate_up_q4mw_s8a__avx512>;
  i4m.down = amx_hw::down_auto<amx_hw::down_q4w_s8a__amx, avx512::down_q4mw_s8a__avx512>;

  // The BF16 encoder is integer code; the small-count fallback needs AVX512-BF16
  // (every AMX-BF16 CPU so far has it; without it, tiles serve every count).
  FormatKernels& bf = t->formats[int(QuantScheme::kBF16)];
  bf.prepare_acts = avx512::prepare_acts_bf16__avx512;
  bf.gate_up = cpu.avx512_bf16
                   ? amx_hw::gate_up_auto<amx_hw::gate_up_bf16w_bf16a__amx, avx512::gate_up_bf16w_bf16a__avx512>
                   : amx_hw::gate_up_bf16w_bf16a__amx;
  bf.down = cpu.avx512_bf16 ? amx_hw::down_auto<amx_hw::down_bf16w_bf16a__amx, avx512::down_bf16w_bf16a__avx512>
                            : amx_hw::down_bf16w_bf16a__amx;
}

#endif

}  // namespace kt
