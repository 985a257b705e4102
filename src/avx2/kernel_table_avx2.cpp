// Registers this folder's kernels in the dispatch table: every format, with
// the AVX-VNNI dot products where the CPU has them. The dispatcher calls the
// filler only where CpuFeatures::has_avx2_backend() holds.
#include "avx2/kernels_avx2.h"
#include "kt_kernel/cpu_features.h"
#include "kt_kernel/kernel_table.h"

namespace kt {
namespace avx2 {

void fill_table(KernelTable* t, bool use_vnni) {
  t->convert.bf16_to_f32 = bf16_to_f32_row__avx2;
  t->convert.f32_to_bf16 = f32_to_bf16_row__avx2;

  FormatKernels& bf16 = t->formats[int(QuantScheme::kBF16)];
  bf16.prepare_acts = prepare_acts_bf16__avx2;
  bf16.gate_up = gate_up_bf16w_bf16a__avx2;
  bf16.down = down_bf16w_bf16a__avx2;

  FormatKernels& q8 = t->formats[int(QuantScheme::kInt8PerChannel)];
  q8.prepare_acts = prepare_acts_u8__avx2;
  q8.gate_up = use_vnni ? gate_up_q8w_u8a__avxvnni : gate_up_q8w_u8a__avx2;
  q8.down = use_vnni ? down_q8w_u8a__avxvnni : down_q8w_u8a__avx2;

  FormatKernels& q4s = t->formats[int(QuantScheme::kInt4Sym)];
  q4s.prepare_acts = prepare_acts_s8_sums__avx2;
  q4s.gate_up = use_vnni ? gate_up_q4w_sym_s8a__avxvnni : gate_up_q4w_sym_s8a__avx2;
  q4s.down = use_vnni ? down_q4w_sym_s8a__avxvnni : down_q4w_sym_s8a__avx2;

  FormatKernels& q4a = t->formats[int(QuantScheme::kInt4Asym)];
  q4a.prepare_acts = prepare_acts_s8_sums__avx2;
  q4a.gate_up = use_vnni ? gate_up_q4w_asym_s8a__avxvnni : gate_up_q4w_asym_s8a__avx2;
  q4a.down = use_vnni ? down_q4w_asym_s8a__avxvnni : down_q4w_asym_s8a__avx2;
}

}  // namespace avx2

// Reads only bool fields of CpuFeatures (no inline member is instantiated here).
void fill_kernels_avx2(KernelTable* t, const CpuFeatures& cpu) { avx2::fill_table(t, cpu.avx_vnni); }

}  // namespace kt
