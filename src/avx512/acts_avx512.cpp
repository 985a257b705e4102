// Activation encodings for the AVX-512 kernels (prepare_acts), bit-identical
// to the reference: per row amax, inv = 127 / amax as one scalar fp32
// division, q = round-to-nearest-even(x * inv) clamped to +-127 (clamping
// before rounding gives the same integers, and min/max order makes NaN clamp
// to 127 as fmin does), scale = amax / 127, and a row holding Inf or NaN
// gets inv = 0 and scale NaN; INT8 stores q + 128, INT4 stores q and its sums per
// 32 k; BF16 rounds to nearest even in integer arithmetic (vcvtneps2bf16
// would flush subnormal inputs to zero, the reference does not). Padding
// columns up to round_up(k, 64) hold the encoding of 0.
#include "avx512/avx512_common.h"
#include "avx512/kernels_avx512.h"

namespace kt {
namespace avx512 {
namespace {

// Lanes [i, i + 16) of a row of k valid columns; zero beyond k.
static inline __m512 load16(const float* x, size_t i, size_t k) {
  return i >= k ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(tail_mask16(k - i), x + i);
}

// |x| as bits: magnitudes compare as their bit patterns do (finite < Inf < NaN).
static inline __m512i abs_bits16(__m512 v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
}

// The bits of max |x|: an integer max finds amax and keeps a NaN, which
// max_ps would drop or keep depending on the operand order. Integer max is
// exact in any order, so the four accumulators change nothing but the speed.
static inline uint32_t row_amax_bits(const float* x, size_t k) {
  __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
  size_t i = 0;
  for (; i + 64 <= k; i += 64) {
    m0 = _mm512_max_epi32(abs_bits16(_mm512_loadu_ps(x + i)), m0);
    m1 = _mm512_max_epi32(abs_bits16(_mm512_loadu_ps(x + i + 16)), m1);
    m2 = _mm512_max_epi32(abs_bits16(_mm512_loadu_ps(x + i + 32)), m2);
    m3 = _mm512_max_epi32(abs_bits16(_mm512_loadu_ps(x + i + 48)), m3);
  }
  for (; i < k; i += 16) m0 = _mm512_max_epi32(abs_bits16(load16(x, i, k)), m0);
  return uint32_t(_mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_max_epi32(m0, m1), _mm512_max_epi32(m2, m3))));
}

// Lanes [i, i + 16) of a row of k valid columns quantised; padding lanes
// are 0 whatever inv is (inv is inf for a subnormal amax, and 0 * inf would
// be NaN -> 127).
static inline __m512i quant16(const float* x, size_t i, size_t k, __m512 inv) {
  if (i >= k) return _mm512_setzero_si512();
  const __mmask16 valid = tail_mask16(k - i);
  __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, x + i), inv);
  v = _mm512_min_ps(v, _mm512_set1_ps(127.0f));  // NaN -> 127
  v = _mm512_max_ps(v, _mm512_set1_ps(-127.0f));
  return _mm512_maskz_cvtps_epi32(valid, v);  // round to nearest even (default MXCSR), as nearbyint
}

// Quantises one row; per 32 columns calls sink(index of the 32-chunk, q lo, q hi).
// Returns the row scale.
template <class Sink>
static inline float quantize_row(const float* x, size_t k, size_t kp, Sink sink) {
  const uint32_t bits = row_amax_bits(x, k);
  const bool finite = bits < 0x7f800000u;
  const float amax = _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(int(bits))));
  const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m512 vinv = _mm512_set1_ps(inv);
  for (size_t c = 0; c < kp / 32; ++c) {
    const __m512i q0 = quant16(x, 32 * c, k, vinv);
    const __m512i q1 = quant16(x, 32 * c + 16, k, vinv);
    sink(c, q0, q1);
  }
  return finite ? amax / 127.0f : __builtin_nanf("");
}

static inline __m256i bf16_rne16(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i hi = _mm512_srli_epi32(b, 16);
  const __m512i round = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  __m512i r = _mm512_add_epi32(b, round);
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace

void prepare_acts_bf16__avx512(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* dst = out.data + r * out.row_bytes;
    for (size_t i = 0; i < kp; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), bf16_rne16(load16(xr, i, k)));
  }
}

void prepare_acts_u8__avx512(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  const __m128i bias = _mm_set1_epi8(char(0x80));  // q + 128 == q ^ 0x80 for int8 q
  for (size_t r = 0; r < rows; ++r) {
    uint8_t* dst = out.data + r * out.row_bytes;
    out.row_scale[r] = quantize_row(x + r * ldx, k, kp, [&](size_t c, __m512i q0, __m512i q1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * c), _mm_xor_si128(_mm512_cvtepi32_epi8(q0), bias));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * c + 16), _mm_xor_si128(_mm512_cvtepi32_epi8(q1), bias));
    });
  }
}

void prepare_acts_s8_sums__avx512(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    uint8_t* dst = out.data + r * out.row_bytes;
    int32_t* sums = out.group_sums + r * out.group_sums_stride;
    out.row_scale[r] = quantize_row(x + r * ldx, k, kp, [&](size_t c, __m512i q0, __m512i q1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * c), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * c + 16), _mm512_cvtepi32_epi8(q1));
      sums[c] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    });
  }
}

void bf16_to_f32_row__avx512(const uint16_t* src, size_t n, float* dst) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + i));
    _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}

void f32_to_bf16_row__avx512(const float* src, size_t n, uint16_t* dst) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), bf16_rne16(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    _mm256_mask_storeu_epi16(dst + i, m, bf16_rne16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

}  // namespace avx512
}  // namespace kt
