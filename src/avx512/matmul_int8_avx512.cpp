// INT8 x INT8 gate/up and down with vpdpbusd: the activations are u8 (q + 128)
// and the weights s8, so one instruction multiplies 4 k of 16 rows against a
// broadcast activation quad; the packed compensation (128 * sum_k q8) undoes
// the +128 shift. int32 sums are exact and the fp32 epilogue repeats the
// reference's operations in order, so results are bit-identical to it.
//
// Decode (few tokens per expert) is a GEMV bound by memory bandwidth: all
// tokens ride one pass over the weights, several row blocks (independent
// streams) at once, with software prefetch. Prefill is a register-blocked
// GEMM: 4 row blocks x 6 tokens per tile, the 4 blocks' weights reused from
// L2 by every token tile.
#include "avx512/avx512_common.h"
#include "avx512/kernels_avx512.h"

namespace kt {
namespace avx512 {
namespace {

// Up to this many tokens run as GEMV (one pass, all tokens in one tile):
// measured on Zen 5, the single pass stays at memory speed through 4 tokens
// per expert; from 5 on the 4x6 GEMM tiles with L2 reuse are faster.
constexpr size_t kQ8GemvMaxTokens = 4;
// GEMV: 4 streams per tile (down: 4 row blocks; gate/up: 2 gate + 2 up).
// GEMM: 4 streams x 6 tokens = 24 int32 accumulators (see avx512_common.h).
constexpr size_t kQ8Streams = 4;
constexpr size_t kQ8GemmTokens = 6;

template <int NS, int MT, bool PF>
struct TileQ8 {
  static void run(const Streams& s, const Tokens& tk, float* res) {
    __m512i acc[NS][MT];
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) acc[j][t] = _mm512_setzero_si512();
    const uint8_t* w[NS];
    const uint8_t* a[MT];
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j) w[j] = s.w[j];
#pragma GCC unroll 64
    for (int t = 0; t < MT; ++t) a[t] = tk.act[t];
    const size_t steps = s.steps;
    for (size_t i = 0; i < steps; ++i) {
      const size_t wo = i * kStepBytes, ao = i * 4;
      const ptrdiff_t pfo = PF ? gemv_prefetch_offset(s, wo) : 0;
      if (!PF) _mm_prefetch(reinterpret_cast<const char*>(s.pf_line + wo), kGemmPrefetchHint);
      __m512i wv[NS];
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j) {
        wv[j] = _mm512_loadu_si512(w[j] + wo);
        if (PF) _mm_prefetch(reinterpret_cast<const char*>(w[j] + pfo), _MM_HINT_T0);
      }
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) {
        const __m512i b = bcast32(a[t] + ao);
#pragma GCC unroll 64
        for (int j = 0; j < NS; ++j) acc[j][t] = _mm512_dpbusd_epi32(acc[j][t], b, wv[j]);
      }
    }
    // v = float(acc - comp) * (a_scale * w_scale), as the reference.
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) _mm512_store_si512(res + (j * MT + t) * 16, acc[j][t]);
    memory_barrier(res, res);
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j) {
      const __m512i comp = _mm512_loadu_si512(s.comp[j]);
      const __m512 ws = _mm512_loadu_ps(s.scales[j]);
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) {
        float* r = res + (j * MT + t) * 16;
        const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(tk.scale[t]), ws);
        _mm512_store_ps(r, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(r), comp)), sc));
      }
    }
  }
};

TileFn select_gemv(size_t ns, size_t mt) { return SelectTile<TileQ8, true, 4, 4>::get(ns, mt); }
TileFn select_gemm(size_t ns, size_t mt) { return SelectTile<TileQ8, false, 4, 6>::get(ns, mt); }

static_assert(kQ8GemvMaxTokens <= 4 && kQ8Streams <= 4 && kQ8GemmTokens <= 6, "instantiated tile range");

}  // namespace

void gate_up_q8w_u8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                             size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  if (a.rows <= kQ8GemvMaxTokens)
    drive_gate_up(TilePlan{select_gemv, kQ8Streams / 2, a.rows}, gate, up, block_begin, block_end, a, act, h, ldh);
  else
    drive_gate_up(TilePlan{select_gemm, kQ8Streams / 2, kQ8GemmTokens}, gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q8w_u8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                          const float* row_weight, float* const* out_rows) {
  if (a.rows <= kQ8GemvMaxTokens)
    drive_down(TilePlan{select_gemv, kQ8Streams, a.rows}, w, block_begin, block_end, a, row_weight, out_rows);
  else
    drive_down(TilePlan{select_gemm, kQ8Streams, kQ8GemmTokens}, w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx512
}  // namespace kt
