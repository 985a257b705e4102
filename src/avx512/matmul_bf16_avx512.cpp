// BF16 x BF16 gate/up and down with vdpbf16ps (AVX512-BF16): a 64-byte weight
// step holds 2 k of 16 rows as bf16 pairs, the operand order of the
// instruction against a broadcast activation pair; fp32 accumulation. The
// reference accumulates in double, so results agree to fp32 rounding (a
// tolerance, not bit-exactness).
//
// Decode is a GEMV over one pass of the weights (several streams, software
// prefetch); prefill a register-blocked GEMM of 4 row blocks x 6 tokens with
// the weights reused from L2 by every token tile.
#include "avx512/avx512_common.h"
#include "avx512/kernels_avx512.h"

namespace kt {
namespace avx512 {
namespace {

// Up to this many tokens run as GEMV (one pass, all tokens in one tile).
// BF16 reads 2 bytes per weight, so a single pass stays memory bound to more
// tokens than the integer formats (measured on Zen 5).
constexpr size_t kBf16GemvMaxTokens = 6;
// 4 streams x 6 tokens = 24 fp32 accumulators + 4 weights + 1 broadcast.
constexpr size_t kBf16Streams = 4;
constexpr size_t kBf16GemmTokens = 6;

template <int NS, int MT, bool PF>
struct TileBf16 {
  static void run(const Streams& s, const Tokens& tk, float* res) {
    __m512 acc[NS][MT];
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) acc[j][t] = _mm512_setzero_ps();
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
      __m512bh wv[NS];
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j) {
        wv[j] = (__m512bh)_mm512_loadu_si512(w[j] + wo);
        if (PF) _mm_prefetch(reinterpret_cast<const char*>(w[j] + pfo), _MM_HINT_T0);
      }
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) {
        const __m512bh b = (__m512bh)bcast32(a[t] + ao);
#pragma GCC unroll 64
        for (int j = 0; j < NS; ++j) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], wv[j], b);
      }
    }
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) _mm512_store_ps(res + (j * MT + t) * 16, acc[j][t]);
    memory_barrier(res, res);
  }
};

TileFn select_gemv(size_t ns, size_t mt) { return SelectTile<TileBf16, true, 4, 6>::get(ns, mt); }
TileFn select_gemm(size_t ns, size_t mt) { return SelectTile<TileBf16, false, 4, 6>::get(ns, mt); }

static_assert(kBf16GemvMaxTokens <= 6 && kBf16Streams <= 4 && kBf16GemmTokens <= 6, "instantiated tile range");

}  // namespace

void gate_up_bf16w_bf16a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                 size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                 size_t ldh) {
  if (a.rows <= kBf16GemvMaxTokens)
    drive_gate_up(TilePlan{select_gemv, kBf16Streams / 2, a.rows}, gate, up, block_begin, block_end, a, act, h, ldh);
  else
    drive_gate_up(TilePlan{select_gemm, kBf16Streams / 2, kBf16GemmTokens}, gate, up, block_begin, block_end, a, act,
                  h, ldh);
}

void down_bf16w_bf16a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                              const float* row_weight, float* const* out_rows) {
  if (a.rows <= kBf16GemvMaxTokens)
    drive_down(TilePlan{select_gemv, kBf16Streams, a.rows}, w, block_begin, block_end, a, row_weight, out_rows);
  else
    drive_down(TilePlan{select_gemm, kBf16Streams, kBf16GemmTokens}, w, block_begin, block_end, a, row_weight,
               out_rows);
}

}  // namespace avx512
}  // namespace kt
