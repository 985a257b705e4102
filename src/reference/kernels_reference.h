// Scalar helpers shared by the reference kernels and the packers (baseline
// code only; ISA folders reimplement what they need).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kt_kernel/kernel_table.h"

namespace kt {
namespace ref {

// Quantises k floats to int8 per the activation contract; returns the scale
// (NaN when any of the k floats is Inf or NaN). The weight packers use it too.
float quantize_row_i8(const float* x, size_t k, int8_t* q);

// The gated activation of ActivationParams, in fp32.
float activation(float gate, float up, const ActivationParams& p);

// RowConvertKernels' scalar twins.
void bf16_to_f32_row(const uint16_t* src, size_t n, float* dst);
void f32_to_bf16_row(const float* src, size_t n, uint16_t* dst);

}  // namespace ref
}  // namespace kt
