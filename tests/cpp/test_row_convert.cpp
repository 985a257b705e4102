// RowConvertKernels (the layer's bf16 <-> fp32 row conversions) of every
// available backend against the scalar twins, bit for bit: all 65536 bf16
// values widened; fp32 values narrowed that exercise every rounding case
// (ties to even either way, carries into the exponent and up to infinity,
// subnormals, signed zeros, infinities, quiet and signalling NaNs with
// payloads), at lengths around the vector widths so that every tail path
// runs; nothing written past n. The scalar twins themselves are checked
// against values worked out by hand.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kt_kernel/dispatch.h"
#include "kt_kernel/kernel_table.h"
#include "kt_kernel/types.h"

namespace kt {
namespace {

// fp32 bit patterns that hit every branch of round-to-nearest-even and the
// NaN rule, then random ones.
std::vector<float> hostile_floats(size_t random_count) {
  std::vector<uint32_t> bits = {
      0x00000000u, 0x80000000u,              // signed zeros
      0x7f800000u, 0xff800000u,              // infinities
      0x7fc00000u, 0xffc00001u,              // quiet NaNs, one with a payload
      0x7f800001u, 0xff800001u, 0x7fbfffffu, // signalling NaNs (low payload bits only: quieted by | 0x40)
      0x00000001u, 0x00008000u, 0x00018000u, // subnormals: tiny, a tie to even (down), a tie to even (up)
      0x007fffffu,                           // largest subnormal: carries into the smallest normal
      0x3f808000u, 0x3f818000u,              // ties: 1 + 2^-8 (even, down) and its odd neighbour (up)
      0x3f807fffu, 0x3f808001u,              // just below and above a tie
      0x3fffffffu,                           // carries into the next exponent
      0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu, // largest finite: rounds up to infinity, a tie to infinity, stays finite
      0xbf808000u, 0xc0490fdbu,              // negative tie, -pi
  };
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any;
  while (bits.size() < random_count) bits.push_back(any(rng));
  std::vector<float> v(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) v[i] = bits_to_f32(bits[i]);
  return v;
}

const size_t kLengths[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 2048, 7168, 7169};

TEST(RowConvert, ScalarTwinsMatchHandWorkedValues) {
  const RowConvertKernels& ref = backend_kernels("scalar").convert;
  ASSERT_NE(ref.bf16_to_f32, nullptr);
  ASSERT_NE(ref.f32_to_bf16, nullptr);
  const float in[] = {1.0f, bits_to_f32(0x3f808000u), bits_to_f32(0x3f818000u), bits_to_f32(0x3f808001u),
                      bits_to_f32(0x7f7fffffu), bits_to_f32(0x7f800001u), -0.0f, bits_to_f32(0x00018000u)};
  const uint16_t want[] = {0x3f80, 0x3f80, 0x3f82, 0x3f81, 0x7f80, 0x7fc0, 0x8000, 0x0002};
  uint16_t out[8];
  ref.f32_to_bf16(in, 8, out);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(out[i], want[i]) << "value " << i;
  const uint16_t b[] = {0x3f80, 0xc049, 0x7fc1, 0x0001};
  float w[4];
  ref.bf16_to_f32(b, 4, w);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(f32_to_bits(w[i]), uint32_t(b[i]) << 16) << "value " << i;
}

TEST(RowConvert, EveryBackendWidensLikeTheScalarTwin) {
  const RowConvertKernels& ref = backend_kernels("scalar").convert;
  std::vector<uint16_t> all(65536 + 9);
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i * 40503u);  // odd multiplier: every value, shuffled
  for (const std::string& name : available_backends()) {
    const RowConvertKernels& cv = backend_kernels(name).convert;
    ASSERT_NE(cv.bf16_to_f32, nullptr) << name;
    for (size_t n : {size_t(65536 + 9), size_t(0), size_t(1), size_t(15), size_t(17), size_t(33)}) {
      std::vector<float> want(n + 1, bits_to_f32(0x7fedcba9u)), got(n + 1, bits_to_f32(0x7fedcba9u));
      ref.bf16_to_f32(all.data(), n, want.data());
      cv.bf16_to_f32(all.data(), n, got.data());
      ASSERT_EQ(std::memcmp(want.data(), got.data(), (n + 1) * sizeof(float)), 0) << name << " n=" << n;
    }
  }
}

TEST(RowConvert, EveryBackendNarrowsLikeTheScalarTwin) {
  const RowConvertKernels& ref = backend_kernels("scalar").convert;
  const std::vector<float> src = hostile_floats(20000);
  for (const std::string& name : available_backends()) {
    const RowConvertKernels& cv = backend_kernels(name).convert;
    ASSERT_NE(cv.f32_to_bf16, nullptr) << name;
    for (size_t n : kLengths) {
      for (size_t offset : {size_t(0), size_t(3)}) {  // unaligned starts too
        // One guard value past n shows a write beyond the row.
        std::vector<uint16_t> want(n + 1, 0xabcd), got(n + 1, 0xabcd);
        ref.f32_to_bf16(src.data() + offset, n, want.data());
        cv.f32_to_bf16(src.data() + offset, n, got.data());
        ASSERT_EQ(std::memcmp(want.data(), got.data(), (n + 1) * sizeof(uint16_t)), 0)
            << name << " n=" << n << " offset=" << offset;
      }
    }
    std::vector<uint16_t> want(src.size()), got(src.size());
    ref.f32_to_bf16(src.data(), src.size(), want.data());
    cv.f32_to_bf16(src.data(), src.size(), got.data());
    for (size_t i = 0; i < src.size(); ++i)
      ASSERT_EQ(want[i], got[i]) << name << ": fp32 bits 0x" << std::hex << f32_to_bits(src[i]);
  }
}

}  // namespace
}  // namespace kt
