// Activation encodings for the emulated AMX build ("amx-emu"): the scalar
// contract of kernel_table.h, spelled out like the reference (which keeps its
// own copies private). The real AMX build registers the AVX-512 encoders
// instead, so only the emulated build compiles anything here.
#ifdef KT_AMX_EMULATE

#include <cstdint>

#include "amx/kernels_amx.h"
#include "kt_kernel/types.h"
#include "reference/kernels_reference.h"

namespace kt {
namespace amx_emu {

void prepare_acts_bf16__amx_emu(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data + r * out.row_bytes);
    for (size_t i = 0; i < k; ++i) dst[i] = f32_to_bf16(x[r * ldx + i]);
    for (size_t i = k; i < kp; ++i) dst[i] = 0;
  }
}

void prepare_acts_u8__amx_emu(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    uint8_t* row = out.data + r * out.row_bytes;
    // Quantise in place as s8, then shift to u8 = q + 128 (padding: the encoding of 0).
    out.row_scale[r] = ref::quantize_row_i8(x + r * ldx, k, reinterpret_cast<int8_t*>(row));
    for (size_t i = 0; i < k; ++i) row[i] = uint8_t(int(int8_t(row[i])) + 128);
    for (size_t i = k; i < kp; ++i) row[i] = 128;
  }
}

void prepare_acts_s8_sums__amx_emu(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    int8_t* q = reinterpret_cast<int8_t*>(out.data + r * out.row_bytes);
    out.row_scale[r] = ref::quantize_row_i8(x + r * ldx, k, q);
    for (size_t i = k; i < kp; ++i) q[i] = 0;
    int32_t* sums = out.group_sums + r * out.group_sums_stride;
    for (size_t j = 0; j < kp / kActSumGroup; ++j) {
      int32_t s = 0;
      for (size_t i = 0; i < kActSumGroup; ++i) s += q[j * kActSumGroup + i];
      sums[j] = s;
    }
  }
}

}  // namespace amx_emu
}  // namespace kt

#endif  // KT_AMX_EMULATE
