// prepare_acts of the AVX2 backend: the per-row activation encodings of
// kernel_table.h, bit-identical to the scalar twins (ref::quantize_row_i8 and
// f32_to_bf16), because the quantised activations feed integer dot products
// that must agree exactly across backends.
//
//   amax = max |x|; inv = 127 / amax (one scalar fp32 division);
//   q = clamp(rint(x * inv), -127, 127), with a NaN product clamped to +127
//   as fmin/fmax do; scale = amax / 127. A row holding Inf or NaN has
//   inv = 0 and scale NaN.
//
// Rows are processed 32 floats at a time (four ymm -> one ymm of bytes, and
// one activation-sum group of kActSumGroup). The tail of a row and the
// padding up to round_up(k, 64) go through the same code, with the lanes
// past k forced to the encoding of 0.
#include "avx2/avx2_common.h"
#include "avx2/kernels_avx2.h"

namespace kt {
namespace avx2 {
namespace {

constexpr size_t kQuantChunk = 32;  // floats per quantisation step: 4 x 8 lanes -> 32 bytes
static_assert(kQuantChunk == kActSumGroup, "one chunk is one activation-sum group");
static_assert(kColPad % kQuantChunk == 0, "padded rows are whole chunks");
constexpr size_t kBf16Chunk = 16;  // floats per BF16 step: 2 x 8 lanes -> 32 bytes

// Floats [i, i + 8) of a row with k valid floats; lanes at or past k read 0.
inline __m256 load_padded(const float* x, size_t i, size_t k) {
  if (i + kLanes <= k) return _mm256_loadu_ps(x + i);
  alignas(32) float t[kLanes] = {};
  for (size_t j = 0; j < size_t(kLanes) && i + j < k; ++j) t[j] = x[i + j];
  return _mm256_load_ps(t);
}

// |x| as bits: magnitudes compare as their bit patterns do (finite < Inf < NaN).
inline __m256i abs_bits8(__m256 v) {
  return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
}

// The bits of max |x|: an integer max finds amax and keeps a NaN, which
// max_ps would drop or keep depending on the operand order. Integer max is
// exact in any order, so the four accumulators (as in the AVX-512 encoder)
// change nothing but the speed.
inline uint32_t row_amax_bits(const float* x, size_t k) {
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  size_t i = 0;
  for (; i + 4 * kLanes <= k; i += 4 * kLanes) {
    m0 = _mm256_max_epi32(abs_bits8(_mm256_loadu_ps(x + i)), m0);
    m1 = _mm256_max_epi32(abs_bits8(_mm256_loadu_ps(x + i + 8)), m1);
    m2 = _mm256_max_epi32(abs_bits8(_mm256_loadu_ps(x + i + 16)), m2);
    m3 = _mm256_max_epi32(abs_bits8(_mm256_loadu_ps(x + i + 24)), m3);
  }
  for (; i < k; i += kLanes) m0 = _mm256_max_epi32(abs_bits8(load_padded(x, i, k)), m0);
  const __m256i m = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
  __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(h));
}

// q of floats [i, i + 8); lanes at or past k are 0 (padding), whatever inv
// is (a subnormal amax makes inv infinite, and 0 * inf would give 127).
inline __m256i quantize8(const float* x, size_t i, size_t k, __m256 inv) {
  __m256 r = _mm256_round_ps(_mm256_mul_ps(load_padded(x, i, k), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_min_ps(r, _mm256_set1_ps(127.0f));  // NaN -> 127, as fmin(127, NaN)
  r = _mm256_max_ps(r, _mm256_set1_ps(-127.0f));
  const __m256i q = _mm256_cvtps_epi32(r);
  if (i + kLanes <= k) return q;
  const int valid = i < k ? int(k - i) : 0;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_si256(q, _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane));
}

// q of floats [i, i + 32) as 32 s8 in order; *sum = their sum.
inline __m256i quantize_chunk(const float* x, size_t i, size_t k, __m256 inv, int32_t* sum) {
  const __m256i q0 = quantize8(x, i + 0, k, inv);
  const __m256i q1 = quantize8(x, i + 8, k, inv);
  const __m256i q2 = quantize8(x, i + 16, k, inv);
  const __m256i q3 = quantize8(x, i + 24, k, inv);
  *sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3)));
  // packs work per 128-bit lane: dwords come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] ...
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Quantises one row; writes round_up(k, 64) bytes (u8 = q + 128 when
// biased, else s8 = q) and, when sums is not null, the sum of q per 32 k.
inline float quantize_row(const float* x, size_t k, bool biased, uint8_t* dst, int32_t* sums) {
  const uint32_t bits = row_amax_bits(x, k);
  const bool finite = bits < 0x7f800000u;
  const float amax = _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(int(bits))));
  const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 invv = _mm256_set1_ps(inv);
  const __m256i bias = _mm256_set1_epi8(biased ? char(0x80) : 0);
  const size_t kp = round_up(k, kColPad);
  for (size_t i = 0; i < kp; i += kQuantChunk) {
    int32_t sum;
    const __m256i q = quantize_chunk(x, i, k, invv, &sum);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_xor_si256(q, bias));  // q ^ 0x80 = q + 128
    if (sums) sums[i / kQuantChunk] = sum;
  }
  return finite ? amax / 127.0f : __builtin_nanf("");
}

// f32_to_bf16 on 8 lanes (round to nearest even, NaN -> quiet NaN), in the low half of each dword.
inline __m256i bf16_bits(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i hi = _mm256_srli_epi32(b, 16);
  const __m256i odd = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
  const __m256i is_nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

}  // namespace

void prepare_acts_bf16__avx2(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* dst = out.data + r * out.row_bytes;
    for (size_t i = 0; i < kp; i += kBf16Chunk) {
      const __m256i lo = bf16_bits(load_padded(xr, i, k));
      const __m256i hi = bf16_bits(load_padded(xr, i + kLanes, k));
      // packus per 128-bit lane gives lo[0:4] hi[0:4] lo[4:8] hi[4:8]; reorder the qwords.
      const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), h);
    }
  }
}

void prepare_acts_u8__avx2(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  for (size_t r = 0; r < rows; ++r)
    out.row_scale[r] = quantize_row(x + r * ldx, k, true, out.data + r * out.row_bytes, nullptr);
}

void prepare_acts_s8_sums__avx2(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  for (size_t r = 0; r < rows; ++r)
    out.row_scale[r] = quantize_row(x + r * ldx, k, false, out.data + r * out.row_bytes,
                                    out.group_sums + r * out.group_sums_stride);
}

void bf16_to_f32_row__avx2(const uint16_t* src, size_t n, float* dst) {
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(bits));
  }
}

void f32_to_bf16_row__avx2(const float* src, size_t n, uint16_t* dst) {
  for (size_t i = 0; i < n; i += kBf16Chunk) {
    const size_t m = n - i < kBf16Chunk ? n - i : kBf16Chunk;
    const __m256i lo = bf16_bits(load_padded(src, i, n));
    const __m256i hi = bf16_bits(load_padded(src, i + kLanes, n));
    const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
    if (m == kBf16Chunk) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
    } else {
      alignas(32) uint16_t t[kBf16Chunk];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), h);
      std::memcpy(dst + i, t, m * sizeof(uint16_t));
    }
  }
}

}  // namespace avx2
}  // namespace kt
