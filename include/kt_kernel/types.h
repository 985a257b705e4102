// Element types that cross the library boundary, and exact scalar conversions
// between them.
//
// This header is included by every instruction-set folder. It must therefore
// hold only types, constants and `static inline` functions: a plain `inline`
// function would become a COMDAT symbol, and the linker could keep the copy
// compiled with AVX-512 flags for the baseline code too (a SIGILL on older
// CPUs). Internal linkage keeps each translation unit's copy private.
#pragma once

#include <cstdint>
#include <cstring>

namespace kt {

// Codes are part of the Python ABI of the extension module; never renumber.
enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

static inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kF64: return 8;
  }
  return 0;
}

static inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even, as vcvtneps2bf16 does; NaN stays a (quiet) NaN.
static inline uint16_t f32_to_bf16(float f) {
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

// IEEE half to float, exact for every input (subnormals included).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_f32(sign);
    // Subnormal half: renormalise.
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return bits_to_f32(sign | uint32_t(127 - 15 - e) << 23 | (mant << 13));
  }
  return bits_to_f32(sign | (exp + 127 - 15) << 23 | (mant << 13));
}

// Float to IEEE half, round to nearest even, overflow to infinity.
static inline uint16_t f32_to_f16(float f) {
  const uint32_t b = f32_to_bits(f);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const uint32_t abs = b & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504
  if (abs < 0x38800000u) {                                   // below the smallest normal half
    // Let the FPU do the rounding: adding 0.5 shifts the value so that the
    // half's subnormal quantum (2^-24) becomes the float ulp of 0.5.
    const float shifted = bits_to_f32(abs) + 0.5f;
    return uint16_t(sign | uint16_t(f32_to_bits(shifted) - f32_to_bits(0.5f)));
  }
  uint32_t r = abs + 0xc8000fffu + ((abs >> 13) & 1u);  // rebias exponent, round
  return uint16_t(sign | uint16_t(r >> 13));
}

}  // namespace kt
