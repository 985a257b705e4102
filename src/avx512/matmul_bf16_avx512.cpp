// BF16 x BF16 gate/up and down with vdpbf16ps (AVX512-BF16): a 64-byte weight
// step holds 2 k of 16 rows as bf16 pairs, the operand order of the
// instruction against a broadcast activation pair; fp32 accumulation. The
// reference accumulates in double, so results agree to fp32 rounding (a
// tolerance, not bit-exactness).
//
// Decode is a GEMV over one pass of the weights (gate and up, or two down
// blocks, streamed side by side with software prefetch); prefill a
// register-blocked GEMM of 4 row blocks x 6 tokens with the weights reused
// from L2 by every token tile.
#include "avx512/avx512_common.h"
#include "avx512/kernels_avx512.h"

namespace kt {
namespace avx512 {
namespace {

// Geometry (register budget in avx512_common.h; measured on Zen 5, 1 core,
// DRAM-resident weights). Up to kBf16GemvMaxTokens tokens run as GEMV: one
// pass over the weights with every token in a tile of 2 streams (1 gate + 1
// up block, or 2 down blocks; up to 2 x 12 = 24 accumulators), each stream
// prefetched 4 KiB ahead. That stays at memory speed through 12 tokens
// (768 x 2048 gate/up: 36-41 GB/s at 6-12 tokens, against 26-30 GB/s
// through the GEMM tiles; 2 streams at 4 KiB also read 5-15 percent faster
// than 4 at 1 KiB). Beyond it, GEMM: 4 streams (2 gate + 2 up blocks, or 4
// down blocks) x 6 tokens = 24 accumulators, so that each broadcast feeds 4
// dot products; the first token tile streams the weights (prefetched as in
// GEMV), the others read them from L2 while prefetching the next blocks.
constexpr size_t kBf16GemvMaxTokens = 12;
constexpr size_t kBf16GemvGateUpBlocks = 1;
constexpr size_t kBf16GemvDownBlocks = 2;
// down at up to 4 tokens: one block at a time, read in memory order (down at
// I = 768 and 1408, 1 thread: 3-8 percent faster than two blocks).
constexpr size_t kBf16GemvDownBlocksFew = 1;
constexpr size_t kBf16GemvFewTokens = 4;
constexpr size_t kBf16GemvPrefetchBytes = 4096;
constexpr size_t kBf16GemmTokens = 6;
constexpr size_t kBf16GemmGateUpBlocks = 2;
constexpr size_t kBf16GemmDownBlocks = 4;

template <int NS, int MT, bool PF>
struct TileBf16 {
  // Accumulator sets (DotChains): the sum order differs from the
  // reference's by a few ulp, inside the 1e-5 bound of the floating formats.
  static constexpr int kKS = DotChains<NS, MT>::kKS;
  static void run(const Streams& s, const Tokens& tk, float* res) {
    __m512 acc[kKS][NS][MT];
    zero_acc<DotBf16>(acc);
    dot_steps<DotBf16, PF>(s, tk, 0, s.steps, acc);
    // Pairwise, so the order is fixed by kKS alone.
#pragma GCC unroll 8
    for (int half = kKS / 2; half >= 1; half /= 2)
#pragma GCC unroll 8
      for (int c = 0; c < half; ++c)
#pragma GCC unroll 64
        for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
          for (int t = 0; t < MT; ++t) acc[c][j][t] = _mm512_add_ps(acc[c][j][t], acc[c + half][j][t]);
    emit_tile<NS, MT>(tk, res, acc[0]);
  }
};

static_assert(kBf16GemvDownBlocks <= 2 && 2 * kBf16GemvGateUpBlocks <= 2 && kBf16GemmDownBlocks <= 4 &&
                  2 * kBf16GemmGateUpBlocks <= 4 && kBf16GemvMaxTokens <= kMaxTileTokens && kBf16GemmTokens <= 6,
              "tile bounds (instantiated ranges below)");

TileFn select_gemv(size_t ns, size_t mt) { return SelectTile<TileBf16, true, 2, kBf16GemvMaxTokens>::get(ns, mt); }
TileFn select_gemm_first(size_t ns, size_t mt) { return SelectTile<TileBf16, true, 4, 6>::get(ns, mt); }
TileFn select_gemm(size_t ns, size_t mt) { return SelectTile<TileBf16, false, 4, 6>::get(ns, mt); }

// `matrices` weight matrices share each tile's streams (gate/up: 2).
TilePlan plan_for(size_t tokens, size_t matrices) {
  if (tokens <= kBf16GemvMaxTokens) {
    const size_t down_blocks = tokens <= kBf16GemvFewTokens ? kBf16GemvDownBlocksFew : kBf16GemvDownBlocks;
    return TilePlan{select_gemv, select_gemv, matrices == 1 ? down_blocks : kBf16GemvGateUpBlocks, tokens,
                    kBf16GemvPrefetchBytes, matrices == 2};
  }
  return TilePlan{select_gemm_first, select_gemm, matrices == 1 ? kBf16GemmDownBlocks : kBf16GemmGateUpBlocks,
                  kBf16GemmTokens};
}

}  // namespace

void gate_up_bf16w_bf16a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                                 size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                                 size_t ldh) {
  drive_gate_up(plan_for(a.rows, 2), gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_bf16w_bf16a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                              const float* row_weight, float* const* out_rows) {
  drive_down(plan_for(a.rows, 1), w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx512
}  // namespace kt
