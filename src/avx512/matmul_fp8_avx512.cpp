// FP8 block (kFP8Block) x BF16 gate/up and down: e4m3 codes (1 byte per
// weight, INT8 byte order: a 64-byte step holds 4 k of 16 rows) decoded on
// the fly and fed to vdpbf16ps against broadcast bf16 activation pairs, fp32
// accumulation per group of K, closed with the group scale.
//
// Decode, per step and stream: vpshufb puts code[r][k0 + t] in the high
// byte of a 16-bit lane, in bf16-pair order (A: t = 0, 1; B: t = 2, 3);
// an arithmetic shift right by 1 and a mask (clear bit 14) give the fp16
// bits sign << 15 | (code & 0x7f) << 7, which is the e4m3 value / 256
// exactly, subnormals included (fp16 exponent bias 15 = e4m3 bias 7 + 8).
// vcvtph2ps widens to fp32 and vcvtne2ps2bf16 narrows back to bf16, exactly
// (at most 4 significant bits, exponents far inside bf16's range), so the
// products in vdpbf16ps are the reference's products / 256; the 256 is folded
// into the group scale. NaN codes (0x7f / 0xff) decode as +-480 (undefined
// by the format; no packer writes them).
//
// Same drivers and plans as BF16/INT8: decode is a GEMV streaming the
// weights once with prefetch; prefill a GEMM with weights reused from L2.
// The fp32 group accumulators of the tile live in a stack tile (L1).
#include "avx512/avx512_common.h"
#include "avx512/kernels_avx512.h"

namespace kt {
namespace avx512 {
namespace {

constexpr size_t kFp8GemvMaxTokens = 8;
constexpr size_t kFp8GemvGateUpBlocks = 1;
constexpr size_t kFp8GemvDownBlocks = 2;
constexpr size_t kFp8GemvPrefetchBytes = 2048;
constexpr size_t kFp8GemmTokens = 4;
constexpr size_t kFp8GemmGateUpBlocks = 2;
constexpr size_t kFp8GemmDownBlocks = 4;

struct Fp8Decoder {
  __m512i ctl_a, ctl_b, mask;
  Fp8Decoder() {
    // Per 128-bit lane: rows i = 0..3, source bytes 4i + t. Output dword i:
    // words (code t0 << 8, code t1 << 8); 0x80 zeroes a byte.
    alignas(16) uint32_t a[4], b[4];
    for (uint32_t i = 0; i < 4; ++i) {
      a[i] = 0x80u | (4 * i) << 8 | 0x80u << 16 | (4 * i + 1) << 24;
      b[i] = 0x80u | (4 * i + 2) << 8 | 0x80u << 16 | (4 * i + 3) << 24;
    }
    ctl_a = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(a)));
    ctl_b = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    mask = _mm512_set1_epi16(short(0xbfff));
  }
  __m512bh half(__m512i x, __m512i ctl) const {
    const __m512i w = _mm512_and_si512(_mm512_srai_epi16(_mm512_shuffle_epi8(x, ctl), 1), mask);
    const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
    const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
    return _mm512_cvtne2ps_pbh(hi, lo);
  }
};

template <int NS, int MT, bool PF>
struct TileFp8 {
  static void run(const Streams& s, const Tokens& tk, float* res) {
    alignas(64) float facc[NS * MT * 16];
#pragma GCC unroll 64
    for (int i = 0; i < NS * MT; ++i) _mm512_store_ps(facc + i * 16, _mm512_setzero_ps());
    const Fp8Decoder dec;
    const uint8_t* w[NS];
    const uint8_t* a[MT];
    tile_pointers(s, tk, w, a);
    const size_t gsteps = s.group_steps;
    size_t i = 0;
    for (size_t g = 0; g < s.groups; ++g) {
      __m512 acc[NS][MT];
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
        for (int t = 0; t < MT; ++t) acc[j][t] = _mm512_setzero_ps();
      for (const size_t end = i + gsteps; i < end; ++i) {
        const size_t wo = i * kStepBytes, ao = i * 8;  // 4 k of bf16 activations
        const ptrdiff_t pfo = PF ? gemv_prefetch_offset(s, wo) : 0;
        if (!PF) l2_step_prefetches(s, wo, i);
        __m512bh wa[NS], wb[NS];
#pragma GCC unroll 64
        for (int j = 0; j < NS; ++j) {
          const __m512i x = _mm512_loadu_si512(w[j] + wo);
          if (PF) _mm_prefetch(reinterpret_cast<const char*>(w[j] + pfo), _MM_HINT_T0);
          wa[j] = dec.half(x, dec.ctl_a);
          wb[j] = dec.half(x, dec.ctl_b);
        }
#pragma GCC unroll 64
        for (int t = 0; t < MT; ++t) {
          const __m512bh ba = (__m512bh)bcast32(a[t] + ao);
          const __m512bh bb = (__m512bh)bcast32(a[t] + ao + 4);
#pragma GCC unroll 64
          for (int j = 0; j < NS; ++j) {
            acc[j][t] = _mm512_dpbf16_ps(acc[j][t], wa[j], ba);
            acc[j][t] = _mm512_dpbf16_ps(acc[j][t], wb[j], bb);
          }
        }
      }
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j) {
        const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(s.scales[j] + g * kRowBlock), _mm512_set1_ps(256.0f));
#pragma GCC unroll 64
        for (int t = 0; t < MT; ++t) {
          float* f = facc + (j * MT + t) * 16;
          _mm512_store_ps(f, _mm512_fmadd_ps(acc[j][t], sc, _mm512_load_ps(f)));
        }
      }
    }
    __m512 v[NS][MT];
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) v[j][t] = _mm512_load_ps(facc + (j * MT + t) * 16);
    emit_tile<NS, MT>(tk, res, v);
  }
};

static_assert(kFp8GemvDownBlocks <= 2 && 2 * kFp8GemvGateUpBlocks <= 2 && kFp8GemmDownBlocks <= 4 &&
                  2 * kFp8GemmGateUpBlocks <= 4 && kFp8GemvMaxTokens <= kMaxTileTokens && kFp8GemmTokens <= 4,
              "tile bounds (instantiated ranges below)");

TileFn select_gemv(size_t ns, size_t mt) { return SelectTile<TileFp8, true, 2, kFp8GemvMaxTokens>::get(ns, mt); }
TileFn select_gemm_first(size_t ns, size_t mt) { return SelectTile<TileFp8, true, 4, 4>::get(ns, mt); }
TileFn select_gemm(size_t ns, size_t mt) { return SelectTile<TileFp8, false, 4, 4>::get(ns, mt); }

TilePlan plan_for(size_t tokens, size_t matrices) {
  if (tokens <= kFp8GemvMaxTokens)
    return TilePlan{select_gemv, select_gemv, matrices == 1 ? kFp8GemvDownBlocks : kFp8GemvGateUpBlocks, tokens,
                    kFp8GemvPrefetchBytes};
  return TilePlan{select_gemm_first, select_gemm, matrices == 1 ? kFp8GemmDownBlocks : kFp8GemmGateUpBlocks,
                  kFp8GemmTokens};
}

}  // namespace

void gate_up_fp8w_bf16a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                size_t ldh) {
  drive_gate_up(plan_for(a.rows, 2), gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_fp8w_bf16a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                             const float* row_weight, float* const* out_rows) {
  drive_down(plan_for(a.rows, 1), w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx512
}  // namespace kt
