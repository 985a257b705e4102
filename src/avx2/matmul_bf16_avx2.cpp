// BF16 gate_up and down for CPUs with AVX2 and FMA (no native bf16
// arithmetic): weights and activations are widened to fp32 (a bf16 is the
// high half of an fp32) and accumulated with fp32 FMAs. The reference sums in
// double, so results agree to rounding (about K * 2^-24 relative), not bit
// for bit.
//
// A weight step is 64 bytes: 16 rows x 2 k, each 32-bit lane holding one
// row's pair (k0 low, k0 + 1 high). Shifting a lane left by 16 widens the k0
// value; masking off its low half widens the k0 + 1 value. The activation
// pair is broadcast and widened the same way.
#include "avx2/avx2_common.h"
#include "avx2/kernels_avx2.h"

namespace kt {
namespace avx2 {
namespace {

inline __m256 widen_even(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
inline __m256 widen_odd(__m256i pairs, __m256i high_mask) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, high_mask));
}

struct Bf16Kern {
  template <int MR, int NB>
  static void tile(const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0, float* v) {
    const PackedGeometry& g = w.geo;
    const uint8_t* wb[NB];
    for (int nb = 0; nb < NB; ++nb) wb[nb] = w.weights + (block + size_t(nb)) * g.block_weight_bytes;
    const uint8_t* ap[MR];
    for (int m = 0; m < MR; ++m) ap[m] = a.data + act_row(a, m0 + size_t(m)) * a.row_bytes;
    const __m256i high_mask = _mm256_set1_epi32(int32_t(0xffff0000u));

    __m256 acc[MR][NB][kHalves];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
      for (int nb = 0; nb < NB; ++nb) acc[m][nb][0] = acc[m][nb][1] = _mm256_setzero_ps();

    const size_t steps = g.cols_padded / 2;  // 2 k per step
    for (size_t s = 0; s < steps; ++s) {
#pragma GCC unroll 16
      for (int nb = 0; nb < NB; ++nb) {
        const uint8_t* p = wb[nb] + s * kStepBytes;
        const __m256i w0 = load_half(p), w1 = load_half(p + kHalfBytes);
        const __m256 e0 = widen_even(w0), o0 = widen_odd(w0, high_mask);
        const __m256 e1 = widen_even(w1), o1 = widen_odd(w1, high_mask);
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          const __m256i x = bcast_u32(ap[m] + 4 * s);  // activation elements 2s, 2s + 1
          const __m256 xe = widen_even(x), xo = widen_odd(x, high_mask);
          acc[m][nb][0] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, acc[m][nb][0]));
          acc[m][nb][1] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, acc[m][nb][1]));
        }
      }
    }

#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
      for (int nb = 0; nb < NB; ++nb)
#pragma GCC unroll 2
        for (int h = 0; h < kHalves; ++h)
          _mm256_store_ps(v + size_t(m) * NB * kRowBlock + size_t(nb) * kRowBlock + size_t(h) * kLanes, acc[m][nb][h]);
  }
};

void tiles_bf16__avx2(int mr, int nb, const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0,
                      float* v) {
  compute_tile<Bf16Kern>(mr, nb, w, block, a, m0, v);
}

}  // namespace

void gate_up_bf16w_bf16a__avx2(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                               size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  run_gate_up(tiles_bf16__avx2, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_bf16w_bf16a__avx2(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                            const float* row_weight, float* const* out_rows) {
  run_down(tiles_bf16__avx2, w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx2
}  // namespace kt
