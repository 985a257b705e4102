// Private helpers of the AVX2 backend (the fallback for CPUs without
// AVX-512): ymm geometry of the packed layout, an accurate vector exp, the
// gated activation, and the tile driver every format's gate_up and down share.
//
// This folder is compiled with AVX2 flags but linked with baseline code, so
// everything here has internal linkage (`static inline`, templates declared
// `static`, policy structs in anonymous namespaces of the .cpp files): no copy
// compiled with AVX2 flags can be picked by the linker for baseline code. For
// the same reason nothing from <algorithm>, <vector> or <cmath> is used.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kt_kernel/kernel_table.h"

namespace kt {
namespace avx2 {

// A 16-row block is two ymm of 8 fp32/int32 lanes (one lane per output row);
// a 64-byte k-step of a block is two 32-byte loads, one per half.
constexpr int kLanes = 8;
constexpr int kHalves = int(kRowBlock) / kLanes;             // 2
constexpr size_t kHalfBytes = kStepBytes / size_t(kHalves);  // 32
static_assert(kHalves == 2 && kHalfBytes == 32, "the AVX2 kernels assume 16-row blocks of 64-byte steps");

// Tile geometry (16 ymm registers). A tile is MR activation rows x NB row
// blocks and keeps MR * NB * 2 accumulators live across the K loop. The loop
// body takes one block at a time: its two weight halves (four registers once
// a format has prepared them: INT4 low/high nibbles, BF16 even/odd, INT8 |w|
// and w), then for each token one or two activation broadcasts; plus one or
// two constants (nibble mask, ones, 0x80):
//   MR = 1, NB = 4:  8 accumulators + 4 weight + 2 act + 2 const = 16  (GEMV:
//                    four blocks = four independent weight streams in flight)
//   MR = 2, NB = 2:  8 accumulators + 4 weight + 2 act + 2 const = 16
//   MR = 4, NB = 1:  8 accumulators + 4 weight + 2 act + 2 const = 16  (GEMM:
//                    each weight step is reused by four tokens)
// MR = 3 is the 4-token tile's tail. (INT4's per-group fp32 accumulators,
// touched once per group, live in L1 when they do not fit.) A tile holds at
// most kTileFloats outputs.
constexpr int kMaxTileTokens = 4;
constexpr int kGemvBlocks = 4;  // also the block group the driver sweeps tokens over
constexpr int kTileFloats = kMaxTileTokens * int(kRowBlock);
static_assert(kGemvBlocks * int(kRowBlock) <= kTileFloats, "a GEMV tile must fit the tile buffer");

static inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// The physical activation row of view row m (ActsView.row_index gathers).
static inline size_t act_row(const ActsView& a, size_t m) { return a.row_index ? size_t(a.row_index[m]) : m; }

// Broadcasts the 4 bytes at p to every 32-bit lane.
static inline __m256i bcast_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(int32_t(v));
}

static inline __m256i load_half(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// e^x in fp32 within 1 ulp of glibc's expf over [-110, 95] (Cephes
// polynomial, FMA range reduction). Overflows to +inf above ln(FLT_MAX), flushes through the
// subnormals to 0 below about -103.3, and propagates NaN. 2^n is applied as
// two factors so that n down to -150 (subnormal results) stays exact.
static inline __m256 exp_ps(__m256 x) {
  // min/max return their second operand when one is NaN: NaN passes through.
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), _mm256_min_ps(_mm256_set1_ps(89.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n * ln2 with ln2 split in two (hi has 9 significant bits).
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);  // in [-150, 129]
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// ref::activation on 8 lanes, in the same fp32 operation order; only the exp
// differs (at most 1 ulp).
static inline __m256 activation_ps(__m256 g, __m256 u, const ActivationParams& p) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  if (p.swiglu_limit <= 0.0f) {
    const __m256 e = exp_ps(_mm256_xor_ps(g, sign));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
  }
  const __m256 lim = _mm256_set1_ps(p.swiglu_limit);
  // min/max return their second operand when one is NaN: with the bound
  // first, a NaN g or u passes through, as in the reference.
  const __m256 gl = _mm256_min_ps(lim, g);
  const __m256 ul = _mm256_max_ps(_mm256_xor_ps(lim, sign), _mm256_min_ps(lim, u));
  const __m256 e = exp_ps(_mm256_mul_ps(_mm256_set1_ps(-p.swiglu_alpha), gl));
  return _mm256_mul_ps(_mm256_div_ps(gl, _mm256_add_ps(one, e)), _mm256_add_ps(ul, one));
}

// ---------------------------------------------------------------------------
// The tile driver. A format provides
//   struct Kern { template <int MR, int NB> static void tile(const PackedMatrixView& w, size_t block,
//                                                            const ActsView& a, size_t m0, float* v); };
// computing, over all of K, v[m * NB * 16 + c] = (row 16 * block + c of w) . (view row m0 + m of a),
// the format's fp32 value before the epilogue, for m < MR and c < NB * 16.
// compute_tile<Kern> picks the instantiation; each format wraps it in one
// non-template TileFn (the VNNI ones with the avxvnni target), which the
// shared gate_up / down drivers call once per tile.
using TileFn = void (*)(int mr, int nb, const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0,
                        float* v);

// Number of blocks a tile of `mr` tokens takes when `left` blocks remain.
static inline int tile_blocks(int mr, size_t left) {
  int nb = mr == 1 ? kGemvBlocks : (mr == 2 ? 2 : 1);
  while (size_t(nb) > left) nb /= 2;
  return nb;
}

template <class Kern>
static inline void compute_tile(int mr, int nb, const PackedMatrixView& w, size_t block, const ActsView& a, size_t m0,
                                float* v) {
  switch (mr * 8 + nb) {
    case 1 * 8 + 4: Kern::template tile<1, 4>(w, block, a, m0, v); break;
    case 1 * 8 + 2: Kern::template tile<1, 2>(w, block, a, m0, v); break;
    case 1 * 8 + 1: Kern::template tile<1, 1>(w, block, a, m0, v); break;
    case 2 * 8 + 2: Kern::template tile<2, 2>(w, block, a, m0, v); break;
    case 2 * 8 + 1: Kern::template tile<2, 1>(w, block, a, m0, v); break;
    case 3 * 8 + 1: Kern::template tile<3, 1>(w, block, a, m0, v); break;
    default: Kern::template tile<4, 1>(w, block, a, m0, v); break;
  }
}

// Calls visit(mr, nb, block, m0) for tiles covering blocks [block_begin,
// block_end) x tokens [0, tokens): groups of kGemvBlocks blocks, and within a
// group every token tile, so a group's weights stay in cache while all tokens
// pass over them.
template <class Visit>
static inline void sweep_tiles(size_t block_begin, size_t block_end, size_t tokens, Visit&& visit) {
  for (size_t g0 = block_begin; g0 < block_end; g0 += kGemvBlocks) {
    const size_t g1 = min_size(block_end, g0 + kGemvBlocks);
    for (size_t m0 = 0; m0 < tokens;) {
      const int mr = int(min_size(kMaxTileTokens, tokens - m0));
      for (size_t b = g0; b < g1;) {
        const int nb = tile_blocks(mr, g1 - b);
        visit(mr, nb, b, m0);
        b += size_t(nb);
      }
      m0 += size_t(mr);
    }
  }
}

// Columns of a tile that are real rows of w: [16 * block, 16 * block + count).
static inline size_t tile_columns(size_t block, int nb, size_t n_end) {
  const size_t n0 = block * kRowBlock;
  return n0 >= n_end ? 0 : min_size(size_t(nb) * kRowBlock, n_end - n0);
}

// FormatKernels::gate_up over the tiles of one format.
static inline void run_gate_up(TileFn tile, const PackedMatrixView& gate, const PackedMatrixView& up,
                               size_t block_begin, size_t block_end, const ActsView& a, const ActivationParams& act,
                               float* h, size_t ldh) {
  const size_t n_end = min_size(block_end * kRowBlock, gate.geo.rows);
  sweep_tiles(block_begin, block_end, a.rows, [&](int mr, int nb, size_t block, size_t m0) {
    alignas(32) float vg[kTileFloats];
    alignas(32) float vu[kTileFloats];
    const size_t cols = tile_columns(block, nb, n_end);
    if (cols == 0) return;
    tile(mr, nb, gate, block, a, m0, vg);
    tile(mr, nb, up, block, a, m0, vu);
    const size_t stride = size_t(nb) * kRowBlock;
    for (int m = 0; m < mr; ++m) {
      float* dst = h + (m0 + size_t(m)) * ldh + block * kRowBlock;
      const float* g = vg + size_t(m) * stride;
      const float* u = vu + size_t(m) * stride;
      for (size_t c = 0; c < cols; c += kLanes) {
        const __m256 r = activation_ps(_mm256_load_ps(g + c), _mm256_load_ps(u + c), act);
        if (c + kLanes <= cols) {
          _mm256_storeu_ps(dst + c, r);
        } else {
          alignas(32) float tmp[kLanes];
          _mm256_store_ps(tmp, r);
          for (size_t i = 0; c + i < cols; ++i) dst[c + i] = tmp[i];
        }
      }
    }
  });
}

// FormatKernels::down over the tiles of one format.
static inline void run_down(TileFn tile, const PackedMatrixView& w, size_t block_begin, size_t block_end,
                            const ActsView& a, const float* row_weight, float* const* out_rows) {
  const size_t n_end = min_size(block_end * kRowBlock, w.geo.rows);
  sweep_tiles(block_begin, block_end, a.rows, [&](int mr, int nb, size_t block, size_t m0) {
    alignas(32) float v[kTileFloats];
    const size_t cols = tile_columns(block, nb, n_end);
    if (cols == 0) return;
    tile(mr, nb, w, block, a, m0, v);
    const size_t stride = size_t(nb) * kRowBlock;
    for (int m = 0; m < mr; ++m) {
      float* dst = out_rows[m0 + size_t(m)] + block * kRowBlock;
      const float rw = row_weight[m0 + size_t(m)];
      const __m256 rwv = _mm256_set1_ps(rw);
      const float* vm = v + size_t(m) * stride;
      size_t c = 0;
      // out += rw * v as a multiply then an add (no FMA), like the reference.
      for (; c + kLanes <= cols; c += kLanes)
        _mm256_storeu_ps(dst + c, _mm256_add_ps(_mm256_loadu_ps(dst + c), _mm256_mul_ps(rwv, _mm256_load_ps(vm + c))));
      for (; c < cols; ++c) dst[c] += rw * vm[c];
    }
  });
}

}  // namespace avx2
}  // namespace kt
