// INT8 x INT8 gate/up and down with vpdpbusd: the activations are u8 (q + 128)
// and the weights s8, so one instruction multiplies 4 k of 16 rows against a
// broadcast activation quad; the packed compensation (128 * sum_k q8) undoes
// the +128 shift. int32 sums are exact and the fp32 epilogue repeats the
// reference's operations in order, so results are bit-identical to it.
//
// Decode (few tokens per expert) is a GEMV bound by memory bandwidth: all
// tokens ride one pass over the weights, gate and up (or two down blocks)
// streamed side by side with software prefetch. Prefill is a
// register-blocked GEMM: 4 row blocks x 6 tokens per tile, the blocks'
// weights reused from L2 by every token tile.
#include "avx512/avx512_common.h"
#include "avx512/kernels_avx512.h"

namespace kt {
namespace avx512 {
namespace {

// Geometry (register budget in avx512_common.h; measured on Zen 5, 1 core,
// DRAM-resident weights). Up to kQ8GemvMaxTokens tokens run as GEMV: one
// pass over the weights with every token in a tile of 2 streams (1 gate + 1
// up block, or 2 down blocks; up to 2 x 12 = 24 accumulators), each stream
// prefetched 4 KiB ahead. That stays at memory speed through 12 tokens
// (INT8 768 x 2048 gate/up: 32-36 GB/s at 6-12 tokens, against 24-26 GB/s
// through the GEMM tiles; 2 streams at 4 KiB also read 5-15 percent faster
// than 4 at 1 KiB). Beyond it, GEMM: 4 streams (2 gate + 2 up blocks, or 4
// down blocks) x 6 tokens = 24 accumulators, so that each broadcast feeds 4
// dot products; the first token tile streams the weights (prefetched as in
// GEMV), the others read them from L2 while prefetching the next blocks.
constexpr size_t kQ8GemvMaxTokens = 12;
constexpr size_t kQ8GemvGateUpBlocks = 1;
constexpr size_t kQ8GemvDownBlocks = 2;
// down at up to 6 tokens: one block at a time, read in memory order with the
// prefetch running straight on into the next block (down at I = 768 and
// 1408, 1 thread: 7-14 percent faster than two interleaved blocks; from 8
// tokens on, two streams are as fast or faster).
constexpr size_t kQ8GemvDownBlocksFew = 1;
constexpr size_t kQ8GemvFewTokens = 6;
constexpr size_t kQ8GemvPrefetchBytes = 4096;
constexpr size_t kQ8GemmTokens = 6;
constexpr size_t kQ8GemmGateUpBlocks = 2;
constexpr size_t kQ8GemmDownBlocks = 4;

template <int NS, int MT, bool PF>
struct TileQ8 {
  static constexpr int kKS = DotChains<NS, MT>::kKS;  // accumulator sets, exact in any order
  static void run(const Streams& s, const Tokens& tk, float* res) {
    // The epilogue's scales and compensation (a line each per stream, in
    // per-matrix arrays apart from the weights) are fetched now, while the
    // k loop streams the block (decode, 2 threads, alternated call by call:
    // Qwen3-30B-A3B INT8 0.740-0.744 against 0.744-0.755 ms per layer in six
    // rounds, DeepSeek-V2-Lite 0.5-1.7% faster in four; loaded in the
    // epilogue they waited on memory there).
    if (PF)
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(s.comp[j]), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(s.scales[j]), _MM_HINT_T0);
      }
    __m512i acc[kKS][NS][MT];
    zero_acc<DotU8S8>(acc);
    dot_steps<DotU8S8, PF>(s, tk, 0, s.steps, acc);
#pragma GCC unroll 64
    for (int c = 1; c < kKS; ++c)
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
        for (int t = 0; t < MT; ++t) acc[0][j][t] = _mm512_add_epi32(acc[0][j][t], acc[c][j][t]);
    // v = float(acc - comp) * (a_scale * w_scale), as the reference,
    // straight from the registers (keep_in_registers; without it GCC kept
    // acc in memory through the k loop: INT8 GEMM at 40% of its speed).
    keep_in_registers(acc[0]);
    __m512 v[NS][MT];
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t)
        v[j][t] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[0][j][t], _mm512_loadu_si512(s.comp[j]))),
                                _mm512_mul_ps(_mm512_set1_ps(tk.scale[t]), _mm512_loadu_ps(s.scales[j])));
    emit_tile<NS, MT>(tk, res, v);
  }
};

static_assert(kQ8GemvDownBlocks <= 2 && 2 * kQ8GemvGateUpBlocks <= 2 && kQ8GemmDownBlocks <= 4 &&
                  2 * kQ8GemmGateUpBlocks <= 4 && kQ8GemvMaxTokens <= kMaxTileTokens && kQ8GemmTokens <= 6,
              "tile bounds (instantiated ranges below)");

// The plan of a tile family (TileQ8, TileQ8G): `matrices` weight matrices
// share each tile's streams (gate/up: 2); down runs one block at a time up to
// `one_block_down_tokens` tokens.
template <template <int, int, bool> class Tile>
TilePlan plan_for(size_t tokens, size_t matrices, size_t one_block_down_tokens) {
  if (tokens <= kQ8GemvMaxTokens) {
    const SelectFn gemv = &SelectTile<Tile, true, 2, kQ8GemvMaxTokens>::get;
    const size_t down_blocks = tokens <= one_block_down_tokens ? kQ8GemvDownBlocksFew : kQ8GemvDownBlocks;
    return TilePlan{gemv, gemv, matrices == 1 ? down_blocks : kQ8GemvGateUpBlocks, tokens, kQ8GemvPrefetchBytes,
                    matrices == 2};  // bursts for gate/up (grouped INT8's 2-block down lost with them: 1 core, -5%)
  }
  return TilePlan{&SelectTile<Tile, true, 4, 6>::get, &SelectTile<Tile, false, 4, 6>::get,
                  matrices == 1 ? kQ8GemmDownBlocks : kQ8GemmGateUpBlocks, kQ8GemmTokens};
}

// ---------------------------------------------------------------------------
// INT8 grouped (kInt8Group): the same bytes and vpdpbusd steps, with the
// int32 sums closed per group: acc = fma(float(dot_g - comp_g), scale_g, acc),
// then v = acc * a_scale, as the reference. The fp32 group accumulators live
// in a stack tile (L1), touched once per group, so the registers hold the
// int32 accumulators (the INT4 tiles do the same).
template <int NS, int MT, bool PF>
struct TileQ8G {
  static void run(const Streams& s, const Tokens& tk, float* res) {
    alignas(64) float facc[NS * MT * 16];
#pragma GCC unroll 64
    for (int i = 0; i < NS * MT; ++i) _mm512_store_ps(facc + i * 16, _mm512_setzero_ps());
    const size_t gsteps = s.group_steps;
    size_t i = 0;
    for (size_t g = 0; g < s.groups; ++g, i += gsteps) {
      // The group's scales and compensation: slow streams of their own
      // (prefetch_group_line_ahead).
      if (PF)
#pragma GCC unroll 64
        for (int j = 0; j < NS; ++j) {
          prefetch_group_line_ahead(s.scales[j], g);
          prefetch_group_line_ahead(s.comp[j], g);
        }
      __m512i acc[1][NS][MT];
      zero_acc<DotU8S8>(acc);
      dot_steps<DotU8S8, PF>(s, tk, i, i + gsteps, acc);
      keep_in_registers(acc[0]);
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j) {
        const __m512i comp = _mm512_loadu_si512(s.comp[j] + g * kRowBlock);
        const __m512 sc = _mm512_loadu_ps(s.scales[j] + g * kRowBlock);
#pragma GCC unroll 64
        for (int t = 0; t < MT; ++t) {
          float* f = facc + (j * MT + t) * 16;
          const __m512i d = _mm512_sub_epi32(acc[0][j][t], comp);
          _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, _mm512_load_ps(f)));
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
};

// Grouped tiles close their sums every group with one accumulator set, so a
// one-block decode tile would wait on the dot latency: down keeps two blocks.
constexpr size_t kQ8GOneBlockDownTokens = 0;

}  // namespace

void gate_up_q8gw_u8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                              size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  drive_gate_up(plan_for<TileQ8G>(a.rows, 2, kQ8GOneBlockDownTokens), gate, up, block_begin, block_end, a, act, h,
                ldh);
}

void down_q8gw_u8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                           const float* row_weight, float* const* out_rows) {
  drive_down(plan_for<TileQ8G>(a.rows, 1, kQ8GOneBlockDownTokens), w, block_begin, block_end, a, row_weight,
             out_rows);
}

void gate_up_q8w_u8a__avx512(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                             size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  drive_gate_up(plan_for<TileQ8>(a.rows, 2, kQ8GemvFewTokens), gate, up, block_begin, block_end, a, act, h, ldh);
}

void down_q8w_u8a__avx512(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                          const float* row_weight, float* const* out_rows) {
  drive_down(plan_for<TileQ8>(a.rows, 1, kQ8GemvFewTokens), w, block_begin, block_end, a, row_weight, out_rows);
}

}  // namespace avx512
}  // namespace kt
