// INT8 per-channel gate_up and down for CPUs with AVX2 (and optionally
// AVX-VNNI), bit-identical to the scalar twins: the dot product is exact in
// int32 and the epilogue is the reference's fp32 sequence
//   v = float(acc - comp[n]) * (a_scale[m] * w_scale[n]).
//
// A weight step is 64 bytes: 16 rows x 4 consecutive k (s8), i.e. two ymm
// whose 32-bit lanes are rows; the 4 matching activation bytes are broadcast
// to every lane. Two ways to multiply-accumulate them:
//   * AVX-VNNI: vpdpbusd on the u8 activations (q + 128) directly, giving
//     acc = sum (q + 128) w, from which the epilogue subtracts comp;
//   * AVX2: vpmaddubsw needs an unsigned first operand and saturates at
//     int16, so recover q = a ^ 0x80 and use the sign trick
//     maddubs(|w|, sign(q, w)) = pairs of q * w, at most 2 * 127 * 127 < 2^15
//     (no saturation), then vpmaddwd with ones into int32. That gives
//     sum q w = acc - comp directly (comp = 128 * sum w, the packer's invariant).
#include "avx2/avx2_common.h"
#include "avx2/kernels_avx2.h"

namespace kt {
namespace avx2 {
namespace {

// AVX2 dot: activations converted to s8, weights prepared as (|w|, w).
struct DotQ8Maddubs {
  static constexpr bool kBiasedSum = false;  // the sum is already sum q w
  struct W {
    __m256i mag, w;
  };
  static inline W prep_w(__m256i w) { return {_mm256_abs_epi8(w), w}; }
  static inline __m256i prep_a(__m256i a_u8) { return _mm256_xor_si256(a_u8, _mm256_set1_epi8(char(0x80))); }
  static inline __m256i dot(__m256i acc, __m256i q, const W& w) {
    const __m256i pairs = _mm256_maddubs_epi16(w.mag, _mm256_sign_epi8(q, w.w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

// AVX-VNNI dot on the u8 activations as stored. Only ever inlined into the
// target("avxvnni") entry points below.
struct DotQ8Vnni {
  static constexpr bool kBiasedSum = true;  // sum (q + 128) w: subtract comp
  using W = __m256i;
  static inline W prep_w(__m256i w) { return w; }
  static inline __m256i prep_a(__m256i a_u8) { return a_u8; }
  __attribute__((target("avxvnni"))) static inline __m256i dot(__m256i acc, __m256i a, W w) {
    return _mm256_dpbusd_avx_epi32(acc, a, w);
  }
};

template <class Dot>
struct Q8Kern {
  template <int MR, int NB>
  static void tile(const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0, float* v) {
    const PackedGeometry& g = w.geo;
    const uint8_t* wb[NB];
    for (int nb = 0; nb < NB; ++nb) wb[nb] = w.weights + (block + size_t(nb)) * g.block_weight_bytes;
    const uint8_t* ap[MR];
    float ascale[MR];
    for (int m = 0; m < MR; ++m) {
      const size_t ar = act_row(a, m0 + size_t(m));
      ap[m] = a.data + ar * a.row_bytes;
      ascale[m] = a.row_scale[ar];
    }
    __m256i acc[MR][NB][kHalves];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
      for (int nb = 0; nb < NB; ++nb) acc[m][nb][0] = acc[m][nb][1] = _mm256_setzero_si256();

    const size_t steps = g.cols_padded / 4;  // 4 k per step
    for (size_t s = 0; s < steps; ++s) {
#pragma GCC unroll 16
      for (int nb = 0; nb < NB; ++nb) {
        const uint8_t* p = wb[nb] + s * kStepBytes;
        const typename Dot::W w0 = Dot::prep_w(load_half(p));
        const typename Dot::W w1 = Dot::prep_w(load_half(p + kHalfBytes));
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          const __m256i x = Dot::prep_a(bcast_u32(ap[m] + 4 * s));
          acc[m][nb][0] = Dot::dot(acc[m][nb][0], x, w0);
          acc[m][nb][1] = Dot::dot(acc[m][nb][1], x, w1);
        }
      }
    }

#pragma GCC unroll 16
    for (int nb = 0; nb < NB; ++nb)
#pragma GCC unroll 2
      for (int h = 0; h < kHalves; ++h) {
        const size_t n = (block + size_t(nb)) * kRowBlock + size_t(h) * kLanes;
        const __m256 ws = _mm256_loadu_ps(w.scales + n);
        const __m256i comp = Dot::kBiasedSum ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.compensation + n))
                                             : _mm256_setzero_si256();
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          const __m256 dq = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][nb][h], comp));
          const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(ascale[m]), ws);
          _mm256_store_ps(v + size_t(m) * NB * kRowBlock + size_t(nb) * kRowBlock + size_t(h) * kLanes,
                          _mm256_mul_ps(dq, sc));
        }
      }
  }
};

// The tiles of each dot, as the drivers' TileFn. flatten inlines the whole
// tile dispatch into the VNNI one, so vpdpbusd is emitted only inside a
// function that carries the avxvnni target.
void tiles_q8__avx2(int mr, int nb, const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0, float* v) {
  compute_tile<Q8Kern<DotQ8Maddubs>>(mr, nb, w, block, a, m0, v);
}

__attribute__((target("avxvnni"), flatten)) void tiles_q8__avxvnni(int mr, int nb, const PackedMatrixView& w,
                                                                   size_t block, const ActsView& a, size_t m0,
                                                                   float* v) {
  compute_tile<Q8Kern<DotQ8Vnni>>(mr, nb, w, block, a, m0, v);
}

}  // namespace

void gate_up_q8w_u8a__avx2(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                           size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  run_gate_up(tiles_q8__avx2, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q8w_u8a__avx2(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                        const float* row_weight, float* const* out_rows) {
  run_down(tiles_q8__avx2, w, block_begin, block_end, a, row_weight, out_rows);
}

void gate_up_q8w_u8a__avxvnni(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                              size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  run_gate_up(tiles_q8__avxvnni, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q8w_u8a__avxvnni(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                           const float* row_weight, float* const* out_rows) {
  run_down(tiles_q8__avxvnni, w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx2
}  // namespace kt
