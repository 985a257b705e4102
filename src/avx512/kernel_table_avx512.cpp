// Registers the AVX-512 backend's kernels in the dispatch table: every format
// on AVX-512 F/BW/VL/DQ/VNNI (checked by the dispatcher), BF16 and FP8 only
// where the CPU also has AVX512-BF16; otherwise they stay null and are borrowed from the
// next backend.
#include "avx512/kernels_avx512.h"
#include "kt_kernel/cpu_features.h"
#include "kt_kernel/kernel_table.h"

namespace kt {

void fill_kernels_avx512(KernelTable* t, const CpuFeatures& cpu) {
  t->convert.bf16_to_f32 = avx512::bf16_to_f32_row__avx512;
  t->convert.f32_to_bf16 = avx512::f32_to_bf16_row__avx512;

  FormatKernels& i8 = t->formats[int(QuantScheme::kInt8PerChannel)];
  i8.prepare_acts = avx512::prepare_acts_u8__avx512;
  i8.gate_up = avx512::gate_up_q8w_u8a__avx512;
  i8.down = avx512::down_q8w_u8a__avx512;

  FormatKernels& i8g = t->formats[int(QuantScheme::kInt8Group)];
  i8g.prepare_acts = avx512::prepare_acts_u8__avx512;
  i8g.gate_up = avx512::gate_up_q8gw_u8a__avx512;
  i8g.down = avx512::down_q8gw_u8a__avx512;

  FormatKernels& i4 = t->formats[int(QuantScheme::kInt4Sym)];
  i4.prepare_acts = avx512::prepare_acts_s8_sums__avx512;
  i4.gate_up = avx512::gate_up_q4w_s8a__avx512;
  i4.down = avx512::down_q4w_s8a__avx512;

  FormatKernels& i4m = t->formats[int(QuantScheme::kInt4Asym)];
  i4m.prepare_acts = avx512::prepare_acts_s8_sums__avx512;
  i4m.gate_up = avx512::gate_up_q4mw_s8a__avx512;
  i4m.down = avx512::down_q4mw_s8a__avx512;

  if (cpu.avx512_bf16) {
    FormatKernels& bf = t->formats[int(QuantScheme::kBF16)];
    bf.prepare_acts = avx512::prepare_acts_bf16__avx512;
    bf.gate_up = avx512::gate_up_bf16w_bf16a__avx512;
    bf.down = avx512::down_bf16w_bf16a__avx512;
    FormatKernels& f8 = t->formats[int(QuantScheme::kFP8Block)];
    f8.prepare_acts = avx512::prepare_acts_bf16__avx512;
    f8.gate_up = avx512::gate_up_fp8w_bf16a__avx512;
    f8.down = avx512::down_fp8w_bf16a__avx512;
  }
}

}  // namespace kt
