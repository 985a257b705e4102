// INT4 x INT8 gate/up and down with vpdpbusd. A 64-byte weight step holds 8 k
// of 16 rows as nibbles (low = k0..k0+3, high = k0+4..k0+7 of each row's
// dword), so the unpacked nibbles (0..15) are the unsigned operand and the
// broadcast s8 activation quads the signed one. Per group:
//   symmetric:  acc = fma(float(dot - 8 * asum), scale, acc)
//   with mins:  acc = fma(float(dot), scale, acc); acc = fma(float(asum), min, acc)
// and v = acc * a_scale, with explicit FMAs in the reference's order, so the
// results are bit-identical to it.
//
// The nibbles of a step are unpacked once and reused by every token of the
// tile; the fp32 group accumulators live in a stack tile, read and written
// once per group, so the registers hold the int32 accumulators.
#include "avx512/avx512_common.h"
#include "avx512/kernels_avx512.h"

namespace kt {
namespace avx512 {
namespace {

// Geometry (register budget in avx512_common.h; measured on Zen 5, 1 core,
// DRAM-resident weights). Up to kQ4GemvMaxTokens tokens run as GEMV: one
// pass over the weights with every token in the tile, each stream
// prefetched ahead (5-6 tokens: 24-28 GB/s, against 21-22 through the GEMM
// tiles). Beyond it, 4 x 4 GEMM tiles (16 int32 accumulators + 8 unpacked
// nibble registers + 2 broadcasts + the nibble mask = 27 zmm), the first
// token tile streaming the weights and the others reading them from L2.
constexpr size_t kQ4GemvMaxTokens = 6;
// GEMV streams, each prefetched 4 KiB ahead. gate/up: 1 gate + 1 up block.
// down: one block at 1-3 tokens, two at 4-6 (measured, down at I = 768 and
// 1408, 1 thread: one stream reads 15-25 percent faster than the 4 or 8
// interleaved streams used before; from 4 tokens two streams win). A single
// stream reads its blocks in memory order, and the prefetch runs straight on
// into the next block.
constexpr size_t kQ4GemvGateUpBlocks = 1;
constexpr size_t kQ4GemvDownBlocksFew = 1;
constexpr size_t kQ4GemvFewTokens = 3;
constexpr size_t kQ4GemvDownBlocks = 2;
constexpr size_t kQ4GemvPrefetchBytes = 4096;
constexpr size_t kQ4GemmStreams = 4;
constexpr size_t kQ4GemmTokens = 4;

// Independent int32 accumulator chains of a tile. Each step adds two
// dependent vpdpbusd (low, then high nibbles) to an accumulator, so a tile
// with few accumulators is bound by the instruction's latency, not by memory:
// small tiles (decode) keep the low and high halves in separate accumulators
// (kLH = 2) and round-robin consecutive steps over kKS accumulator sets, so
// that at least 8 chains are in flight. The parts are summed per group;
// integer sums are exact in any order, so results stay bit-identical.
template <int NS, int MT>
struct Q4Chains {
  static constexpr int kLH = NS * MT <= 4 ? 2 : 1;
  static constexpr int kPerSet = NS * MT * kLH;
  static constexpr int kKS = kPerSet >= 8 ? 1 : 8 / kPerSet;
};

template <bool kMins>
struct Q4 {
  template <int NS, int MT, bool PF>
  struct Tile {
    static constexpr int kLH = Q4Chains<NS, MT>::kLH;
    static constexpr int kKS = Q4Chains<NS, MT>::kKS;
    // Whether the accumulators start at the symmetric offset -8 * asum (one
    // accumulator set: GEMM tiles; decode tiles subtract it per group).
    static constexpr bool kFoldOffset = !kMins && kKS * kLH == 1;
    static void run(const Streams& s, const Tokens& tk, float* res) {
      alignas(64) float facc[NS * MT * 16];
#pragma GCC unroll 64
      for (int i = 0; i < NS * MT; ++i) _mm512_store_ps(facc + i * 16, _mm512_setzero_ps());
      const __m512i nib = _mm512_set1_epi8(0x0f);
      const uint8_t* w[NS];
      const uint8_t* a[MT];
      tile_pointers(s, tk, w, a);
      // group_steps is a multiple of 4 (groups of 32, 64, 128 k, or whole
      // rows padded to 64 k), so the kKS-step body never overruns a group.
      const size_t gsteps = s.group_steps, spg = s.sums_per_group;
      size_t i = 0;
      for (size_t g = 0; g < s.groups; ++g) {
        // The scales (and mins): a slow stream of their own (prefetch_group_line_ahead).
        if (PF) {
#pragma GCC unroll 64
          for (int j = 0; j < NS; ++j) {
            prefetch_group_line_ahead(s.scales[j], g);
            if (kMins) prefetch_group_line_ahead(s.mins[j], g);
          }
        }
        // The group's activation sums. Symmetric weights carry +8 in every
        // nibble, so the group's dot is sum - 8 * asum; GEMM tiles start
        // their accumulators at -8 * asum instead of subtracting it per group
        // (g128 prefill +1-3%; integer sums are exact in any order, so the
        // result stays bit-identical to the reference's). Decode tiles sum
        // after the k loop, so nothing else competes for its registers.
        int32_t asum[MT];
        if (kFoldOffset) group_sums(tk, g, spg, asum);
        __m512i acc[kKS * kLH][NS][MT];
#pragma GCC unroll 64
        for (int c = 0; c < kKS * kLH; ++c)
#pragma GCC unroll 64
          for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
            for (int t = 0; t < MT; ++t)
              acc[c][j][t] = (c == 0 && kFoldOffset) ? _mm512_set1_epi32(-8 * asum[t]) : _mm512_setzero_si512();
        for (const size_t end = i + gsteps; i < end; i += kKS) {
#pragma GCC unroll 8
          for (int ks = 0; ks < kKS; ++ks) {
            const size_t wo = (i + ks) * kStepBytes, ao = (i + ks) * 8;
            const ptrdiff_t pfo = PF ? gemv_prefetch_offset(s, wo) : 0;
            if (!PF) l2_step_prefetches(s, wo, i + ks);
            __m512i lo[NS], hi[NS];
#pragma GCC unroll 64
            for (int j = 0; j < NS; ++j) {
              const __m512i raw = _mm512_loadu_si512(w[j] + wo);
              if (PF) _mm_prefetch(reinterpret_cast<const char*>(w[j] + pfo), _MM_HINT_T0);
              lo[j] = _mm512_and_si512(raw, nib);
              hi[j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
            }
            __m512i(&al)[NS][MT] = acc[ks * kLH];
            __m512i(&ah)[NS][MT] = acc[ks * kLH + kLH - 1];
#pragma GCC unroll 64
            for (int t = 0; t < MT; ++t) {
              const __m512i b0 = bcast32(a[t] + ao);
              const __m512i b1 = bcast32(a[t] + ao + 4);
#pragma GCC unroll 64
              for (int j = 0; j < NS; ++j) {
                al[j][t] = _mm512_dpbusd_epi32(al[j][t], lo[j], b0);
                ah[j][t] = _mm512_dpbusd_epi32(ah[j][t], hi[j], b1);
              }
            }
          }
        }
        // The sets summed into the first (integer sums: exact in any order),
        // then the group folded into the fp32 accumulators straight from the
        // registers (keep_in_registers).
#pragma GCC unroll 64
        for (int c = 1; c < kKS * kLH; ++c)
#pragma GCC unroll 64
          for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
            for (int t = 0; t < MT; ++t) acc[0][j][t] = _mm512_add_epi32(acc[0][j][t], acc[c][j][t]);
        keep_in_registers(acc[0]);
        if (!kFoldOffset) group_sums(tk, g, spg, asum);
#pragma GCC unroll 64
        for (int j = 0; j < NS; ++j) {
          const __m512 sc = _mm512_loadu_ps(s.scales[j] + g * kRowBlock);
          const __m512 mn = kMins ? _mm512_loadu_ps(s.mins[j] + g * kRowBlock) : _mm512_setzero_ps();
#pragma GCC unroll 64
          for (int t = 0; t < MT; ++t) {
            float* f = facc + (j * MT + t) * 16;
            _mm512_store_ps(f, group_step(acc[0][j][t], sc, mn, asum[t], _mm512_load_ps(f)));
          }
        }
      }
      __m512 v[NS][MT];
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
        for (int t = 0; t < MT; ++t)
          v[j][t] = _mm512_mul_ps(_mm512_load_ps(facc + (j * MT + t) * 16), _mm512_set1_ps(tk.scale[t]));
      emit_tile<NS, MT>(tk, res, v);
    }

    // Each token's activation sum over group g (from its per-32 sums).
    static inline void group_sums(const Tokens& tk, size_t g, size_t spg, int32_t (&asum)[MT]) {
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) {
        const int32_t* gs = tk.sums[t] + g * spg;
        int32_t sum = 0;
        for (size_t q = 0; q < spg; ++q) sum += gs[q];
        asum[t] = sum;
      }
    }

    // One group's int32 dot products into the fp32 accumulator, in the
    // reference's operation order.
    static inline __m512 group_step(__m512i d, __m512 sc, __m512 mn, int32_t asum, __m512 f) {
      if (!kMins && !kFoldOffset) d = _mm512_sub_epi32(d, _mm512_set1_epi32(8 * asum));
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, f);
      if (kMins) v = _mm512_fmadd_ps(_mm512_set1_ps(float(asum)), mn, v);
      return v;
    }
  };
};

static_assert(kQ4GemmStreams % 2 == 0 && kQ4GemmStreams <= kMaxStreams && kQ4GemmTokens <= kMaxTileTokens &&
                  2 * kQ4GemvGateUpBlocks <= 4 && kQ4GemvDownBlocks <= 4 && kQ4GemvDownBlocksFew <= 4 &&
                  kQ4GemvMaxTokens <= 6,
              "tile bounds (instantiated ranges below)");

template <bool kMins>
TileFn select_gemv(size_t ns, size_t mt) {
  return SelectTile<Q4<kMins>::template Tile, true, 4, kQ4GemvMaxTokens>::get(ns, mt);
}
template <bool kMins>
TileFn select_gemm_first(size_t ns, size_t mt) {
  return SelectTile<Q4<kMins>::template Tile, true, kQ4GemmStreams, kQ4GemmTokens>::get(ns, mt);
}
template <bool kMins>
TileFn select_gemm(size_t ns, size_t mt) {
  return SelectTile<Q4<kMins>::template Tile, false, kQ4GemmStreams, kQ4GemmTokens>::get(ns, mt);
}

// `matrices` weight matrices share each tile's streams (gate/up: 2).
template <bool kMins>
TilePlan plan_for(size_t tokens, size_t matrices) {
  if (tokens <= kQ4GemvMaxTokens) {
    if (matrices == 2)
      return TilePlan{select_gemv<kMins>, select_gemv<kMins>, kQ4GemvGateUpBlocks, tokens, kQ4GemvPrefetchBytes};
    return TilePlan{select_gemv<kMins>, select_gemv<kMins>,
                    tokens <= kQ4GemvFewTokens ? kQ4GemvDownBlocksFew : kQ4GemvDownBlocks, tokens, kQ4GemvPrefetchBytes};
  }
  return TilePlan{select_gemm_first<kMins>, select_gemm<kMins>, kQ4GemmStreams / matrices, kQ4GemmTokens};
}

template <bool kMins>
void gate_up_q4(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin, size_t block_end,
                const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  drive_gate_up(plan_for<kMins>(a.rows, 2), gate, up, block_begin, block_end, a, act, h, ldh);
}

template <bool kMins>
void down_q4(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
             const float* row_weight, float* const* out_rows) {
  drive_down(plan_for<kMins>(a.rows, 1), w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace

void gate_up_q4w_s8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                             size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  gate_up_q4<false>(gate, up, block_begin, block_end, a, act, h, ldh);
}
void down_q4w_s8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                          const float* row_weight, float* const* out_rows) {
  down_q4<false>(w, block_begin, block_end, a, row_weight, out_rows);
}
void gate_up_q4mw_s8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                              size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  gate_up_q4<true>(gate, up, block_begin, block_end, a, act, h, ldh);
}
void down_q4mw_s8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                           const float* row_weight, float* const* out_rows) {
  down_q4<true>(w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx512
}  // namespace kt
