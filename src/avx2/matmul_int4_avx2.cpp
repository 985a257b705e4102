// INT4 (symmetric and asymmetric, per group or per channel) gate_up and down
// for CPUs with AVX2 (and optionally AVX-VNNI), bit-identical to the scalar
// twins: per group g the integer dot is exact in int32, and the epilogue is
// the reference's sequence of explicit FMAs,
//   symmetric:   acc = fma(float(dot_g - 8 * asum_g), scale, acc)
//   asymmetric:  acc = fma(float(dot_g), scale, acc); acc = fma(float(asum_g), min, acc)
//   v = acc * a_scale.
//
// A weight step is 64 bytes: 16 rows x 8 k, byte 4r + t holding k0 + t in
// its low nibble and k0 + 4 + t in its high nibble, i.e. two ymm of row
// lanes. Masking gives the low-nibble and high-nibble vectors (u4 in u8),
// which multiply the broadcast activation bytes k0..k0+3 and k0+4..k0+7 (s8):
//   * AVX2: vpmaddubsw(u4, s8): pairs at most 2 * 15 * 127, and the sum of
//     the low and high results at most 4 * 15 * 127 < 2^15, so one vpmaddwd
//     with ones per step carries them to int32 exactly;
//   * AVX-VNNI: two vpdpbusd(u4, s8).
#include "avx2/avx2_common.h"
#include "avx2/kernels_avx2.h"

namespace kt {
namespace avx2 {
namespace {

struct DotQ4Maddubs {
  static inline __m256i dot(__m256i acc, __m256i lo, __m256i a_lo, __m256i hi, __m256i a_hi) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

// Only ever inlined into the target("avxvnni") entry points below.
struct DotQ4Vnni {
  __attribute__((target("avxvnni"))) static inline __m256i dot(__m256i acc, __m256i lo, __m256i a_lo, __m256i hi,
                                                                __m256i a_hi) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, lo, a_lo), hi, a_hi);
  }
};

template <QuantScheme S, class Dot>
struct Q4Kern {
  static_assert(S == QuantScheme::kInt4Sym || S == QuantScheme::kInt4Asym, "INT4 schemes only");

  template <int MR, int NB>
  static void tile(const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0, float* v) {
    const PackedGeometry& g = w.geo;
    const uint8_t* wb[NB];
    for (int nb = 0; nb < NB; ++nb) wb[nb] = w.weights + (block + size_t(nb)) * g.block_weight_bytes;
    const uint8_t* ap[MR];
    const int32_t* sums[MR];
    float ascale[MR];
    for (int m = 0; m < MR; ++m) {
      const size_t ar = act_row(a, m0 + size_t(m));
      ap[m] = a.data + ar * a.row_bytes;
      sums[m] = a.group_sums + ar * a.group_sums_stride;
      ascale[m] = a.row_scale[ar];
    }
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const size_t steps_per_group = g.group_size / 8;  // 8 k per step
    const size_t sums_per_group = g.group_size / kActSumGroup;

    __m256 facc[MR][NB][kHalves];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
      for (int nb = 0; nb < NB; ++nb) facc[m][nb][0] = facc[m][nb][1] = _mm256_setzero_ps();

    for (size_t grp = 0; grp < g.groups; ++grp) {
      __m256i dot[MR][NB][kHalves];
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
        for (int nb = 0; nb < NB; ++nb) dot[m][nb][0] = dot[m][nb][1] = _mm256_setzero_si256();

      const size_t s_end = (grp + 1) * steps_per_group;
      for (size_t s = grp * steps_per_group; s < s_end; ++s) {
#pragma GCC unroll 16
        for (int nb = 0; nb < NB; ++nb) {
          const uint8_t* p = wb[nb] + s * kStepBytes;
          const __m256i w0 = load_half(p), w1 = load_half(p + kHalfBytes);
          const __m256i lo0 = _mm256_and_si256(w0, nibble), hi0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), nibble);
          const __m256i lo1 = _mm256_and_si256(w1, nibble), hi1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), nibble);
#pragma GCC unroll 16
          for (int m = 0; m < MR; ++m) {
            const __m256i a_lo = bcast_u32(ap[m] + 8 * s), a_hi = bcast_u32(ap[m] + 8 * s + 4);
            dot[m][nb][0] = Dot::dot(dot[m][nb][0], lo0, a_lo, hi0, a_hi);
            dot[m][nb][1] = Dot::dot(dot[m][nb][1], lo1, a_lo, hi1, a_hi);
          }
        }
      }

#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        int32_t asum = 0;
        for (size_t j = grp * sums_per_group; j < (grp + 1) * sums_per_group; ++j) asum += sums[m][j];
#pragma GCC unroll 16
        for (int nb = 0; nb < NB; ++nb)
#pragma GCC unroll 2
          for (int h = 0; h < kHalves; ++h) {
            const size_t si = ((block + size_t(nb)) * g.groups + grp) * kRowBlock + size_t(h) * kLanes;
            const __m256 scale = _mm256_loadu_ps(w.scales + si);
            if (S == QuantScheme::kInt4Sym) {
              const __m256i centred = _mm256_sub_epi32(dot[m][nb][h], _mm256_set1_epi32(8 * asum));
              facc[m][nb][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), scale, facc[m][nb][h]);
            } else {
              facc[m][nb][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][nb][h]), scale, facc[m][nb][h]);
              const __m256 mins = _mm256_loadu_ps(w.mins + si);
              facc[m][nb][h] = _mm256_fmadd_ps(_mm256_set1_ps(float(asum)), mins, facc[m][nb][h]);
            }
          }
      }
    }

#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
      for (int nb = 0; nb < NB; ++nb)
#pragma GCC unroll 2
        for (int h = 0; h < kHalves; ++h)
          _mm256_store_ps(v + size_t(m) * NB * kRowBlock + size_t(nb) * kRowBlock + size_t(h) * kLanes,
                          _mm256_mul_ps(facc[m][nb][h], _mm256_set1_ps(ascale[m])));
  }
};

// The tiles of each (scheme, dot), as the drivers' TileFn. flatten inlines
// the whole tile dispatch into the VNNI ones, so vpdpbusd is emitted only
// inside functions that carry the avxvnni target.
void tiles_q4_sym__avx2(int mr, int nb, const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0,
                        float* v) {
  compute_tile<Q4Kern<QuantScheme::kInt4Sym, DotQ4Maddubs>>(mr, nb, w, block, a, m0, v);
}

void tiles_q4_asym__avx2(int mr, int nb, const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0,
                         float* v) {
  compute_tile<Q4Kern<QuantScheme::kInt4Asym, DotQ4Maddubs>>(mr, nb, w, block, a, m0, v);
}

__attribute__((target("avxvnni"), flatten)) void tiles_q4_sym__avxvnni(int mr, int nb, const PackedMatrixView& w,
                                                                       size_t block, const ActsView& a, size_t m0,
                                                                       float* v) {
  compute_tile<Q4Kern<QuantScheme::kInt4Sym, DotQ4Vnni>>(mr, nb, w, block, a, m0, v);
}

__attribute__((target("avxvnni"), flatten)) void tiles_q4_asym__avxvnni(int mr, int nb, const PackedMatrixView& w,
                                                                        size_t block, const ActsView& a, size_t m0,
                                                                        float* v) {
  compute_tile<Q4Kern<QuantScheme::kInt4Asym, DotQ4Vnni>>(mr, nb, w, block, a, m0, v);
}

}  // namespace

void gate_up_q4w_sym_s8a__avx2(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                               size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  run_gate_up(tiles_q4_sym__avx2, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q4w_sym_s8a__avx2(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                            const float* row_weight, float* const* out_rows) {
  run_down(tiles_q4_sym__avx2, w, block_begin, block_end, a, row_weight, out_rows);
}

void gate_up_q4w_sym_s8a__avxvnni(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                  size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                  size_t ldh) {
  run_gate_up(tiles_q4_sym__avxvnni, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q4w_sym_s8a__avxvnni(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                               const float* row_weight, float* const* out_rows) {
  run_down(tiles_q4_sym__avxvnni, w, block_begin, block_end, a, row_weight, out_rows);
}

void gate_up_q4w_asym_s8a__avx2(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                size_t ldh) {
  run_gate_up(tiles_q4_asym__avx2, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q4w_asym_s8a__avx2(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                             const float* row_weight, float* const* out_rows) {
  run_down(tiles_q4_asym__avx2, w, block_begin, block_end, a, row_weight, out_rows);
}

void gate_up_q4w_asym_s8a__avxvnni(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                   size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                   size_t ldh) {
  run_gate_up(tiles_q4_asym__avxvnni, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q4w_asym_s8a__avxvnni(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                                const float* row_weight, float* const* out_rows) {
  run_down(tiles_q4_asym__avxvnni, w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx2
}  // namespace kt
