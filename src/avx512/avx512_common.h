// Private helpers of the AVX-512 backend, shared by its translation units:
// the tile geometry, the vector exp and gated activation of the gate/up
// epilogue, masks for partial row blocks, and the two drivers that walk a
// range of row blocks and a set of activation rows, calling a format's tile
// kernel and applying the gate/up or down epilogue.
//
// Everything here has internal linkage (`static inline`, anonymous
// namespace): this header is compiled with AVX-512 flags and must never
// produce a COMDAT symbol that baseline code could share (see types.h). For
// the same reason nothing from <algorithm>, <vector> or <functional> is used.
#pragma once

// GCC 12 reports the deliberately undefined pass-through operand inside the
// AVX-512 intrinsic headers (`__m512 __Y = __Y;`) as uninitialised once they
// are inlined; silence that for the header's own lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kt_kernel/kernel_table.h"
#include "kt_kernel/packed_matrix.h"

namespace kt {
namespace avx512 {
namespace {

// ---------------------------------------------------------------------------
// Geometry.
//
// A "tile" is NS weight streams (one row block of 16 output rows each, so
// one zmm of int32/fp32 per stream and token) times MT activation rows.
// AVX-512 has 32 zmm registers:
//   INT8 / BF16 GEMM: 4 streams x 6 tokens = 24 accumulators, + 4 weight
//     registers (one 64-byte step per stream) + 1 broadcast activation
//     = 29 of 32. Each weight load feeds 6 dot instructions and each
//     broadcast feeds 4, so 10 loads per 24 vpdpbusd: well inside Zen 5's
//     two 512-bit loads per cycle at the 2 vpdpbusd per cycle peak.
//   INT8 / BF16 GEMV: 2 streams x up to 12 tokens = 24 accumulators.
//   INT4 GEMM: the nibbles of each stream are unpacked into two registers
//     (low and high halves of the step) once and reused by every token, so
//     4 streams x 4 tokens = 16 int32 accumulators + 8 unpacked + 2
//     broadcasts + 1 nibble mask = 27; the fp32 group accumulators live in a
//     stack tile (L1) and are touched once per group.
// kMaxStreams / kMaxTileTokens bound the stack arrays of one tile.
constexpr int kMaxStreams = 8;
constexpr int kMaxTileTokens = 12;

// Decode (GEMV) streams each row block once from memory, each stream
// prefetched some KiB ahead so that ~64-128 lines are in flight (the
// ~100 ns DRAM latency times ~40 GB/s is ~4 KiB): 4 KiB per stream for the
// 2-stream tiles, kPrefetchBytes for 4-8 streams (measured: shorter is
// slower, longer no faster). The formats' files choose per tile shape.
constexpr size_t kPrefetchBytes = 1024;
// Prefill (GEMM) reads a group of row blocks from L2 once per token tile
// (4 blocks x 16 rows x K x 1-2 bytes: 128-256 KiB at K = 2048, 0.5-0.9 MiB
// at K = 7168, within the 1 MiB L2) and meanwhile prefetches the next
// group's blocks into L2, one line per step (measured ~10% faster than
// without; T0 no better than T1).
constexpr _mm_hint kGemmPrefetchHint = _MM_HINT_T1;

// ---------------------------------------------------------------------------
// Small helpers (no std:: templates).

static inline size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

// Lanes of a row block that hold real output rows (n < rows).
static inline __mmask16 rows_mask(size_t n0, size_t rows) {
  const size_t valid = rows > n0 ? rows - n0 : 0;
  return valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1u);
}

static inline __mmask16 tail_mask16(size_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1u);
}

static inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

static inline __m512i bcast32(const void* p) { return _mm512_set1_epi32(load_i32(p)); }

// Read straight after the k loop by an epilogue, a tile's accumulators make
// GCC 12 keep a memory copy of each and store it on every step of the loop
// (the register allocator places the epilogue's spills inside it), which
// halves the GEMM speed. The cure: an empty asm that takes every accumulator
// in a vector register ("+v") right after the loop; GCC then keeps them in
// registers throughout, and the epilogue reads them from there. (The earlier
// cure, a round trip through a stack tile behind a memory barrier, cost the
// grouped tiles, which close every group: bench_kernels on one core, 128
// tokens, this instead of it: INT4 g128 +6-9%, INT4 g32 with mins +15-18%,
// INT8 g32 +20-25%; INT8 per channel, one close per tile, alike.)
template <int NS, int MT>
__attribute__((always_inline)) static inline void keep_in_registers(__m512i (&acc)[NS][MT]) {
#pragma GCC unroll 64
  for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
    for (int t = 0; t < MT; ++t) __asm__("" : "+v"(acc[j][t]));
}

// ---------------------------------------------------------------------------
// exp(x) in fp32, within ~1 ulp over the whole range: Cody-Waite reduction
// x = n ln2 + r (|r| <= ln2/2, ln2 split in two so n ln2 is exact), the
// Cephes expf polynomial for e^r, and 2^n applied by vscalefps, which
// produces inf / subnormals / 0 correctly at the ends of the range. The
// clamp keeps n finite for huge |x|; NaN passes through (min/max return the
// second operand when one is NaN, so the constant goes first).
static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(100.0f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-110.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The gated activation of ActivationParams (reference::activation), with the
// same fp32 operation sequence; only exp differs (by about an ulp).
struct Act512 {
  bool oai;
  __m512 limit, neg_limit, neg_alpha;
};

static inline Act512 make_act512(const ActivationParams& p) {
  Act512 a;
  a.oai = p.swiglu_limit > 0.0f;
  a.limit = _mm512_set1_ps(p.swiglu_limit);
  a.neg_limit = _mm512_set1_ps(-p.swiglu_limit);
  a.neg_alpha = _mm512_set1_ps(-p.swiglu_alpha);
  return a;
}

static inline __m512 activation512(__m512 g, __m512 u, const Act512& a) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if (!a.oai) {
    const __m512 e = exp512(_mm512_xor_ps(g, _mm512_set1_ps(-0.0f)));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
  }
  // min/max return their second operand when one is NaN: with the bound
  // first, a NaN g or u passes through, as in the reference.
  const __m512 gl = _mm512_min_ps(a.limit, g);
  const __m512 ul = _mm512_max_ps(a.neg_limit, _mm512_min_ps(a.limit, u));
  const __m512 e = exp512(_mm512_mul_ps(a.neg_alpha, gl));
  return _mm512_mul_ps(_mm512_div_ps(gl, _mm512_add_ps(one, e)), _mm512_add_ps(ul, one));
}

// ---------------------------------------------------------------------------
// Tile interface shared by the formats.
//
// Stream j of a tile is one row block of one matrix; token t is one
// activation row. A format's tile kernel computes, for every (j, t), the 16
// fp32 values w_n . a_t of the format's contract (before the activation or
// the routing weight) and hands them to emit_tile (below): res[(j * MT + t)
// * 16 ...] for gate/up, the output rows for down.
struct Streams {
  const uint8_t* w[kMaxStreams];        // the block's packed weights
  const float* scales[kMaxStreams];     // INT8: [16]; INT4, INT8 grouped: [groups][16]
  const float* mins[kMaxStreams];       // INT4 asymmetric: [groups][16]
  const int32_t* comp[kMaxStreams];     // INT8: [16]; INT8 grouped: [groups][16]
  size_t steps;                         // k-steps of a block (cols_padded / k per step)
  size_t groups, group_steps;           // INT4: groups per row, steps per group
  size_t sums_per_group;                // INT4: activation sums (per 32 k) per group
  size_t block_bytes;                   // bytes of one block's weights
  size_t pf_dist;                       // streaming variant: prefetch distance in bytes
  bool bursts;                          // streaming variant: read in bursts (TilePlan::bursts)
  // Prefetch. Streaming variant: each stream prefetches pf_dist bytes
  // ahead; past the end of its block it continues pf_jump bytes further on,
  // into the block it reads next, so the next group of blocks starts warm.
  // L2 variant: one cache line per step from pf_line, a block of the next
  // group (token tile k >= 1 of a group warms its block k - 1).
  ptrdiff_t pf_jump;
  const uint8_t* pf_line;
  // L2 variant, in the first group of blocks of a call over contiguous
  // activation rows (down): step i also prefetches line min(i, pf_acts_last)
  // of pf_acts, the next token tile's rows, into L2 (elsewhere pf_acts is
  // the tile's own first row, pf_acts_last 0: one cached line). The rows of
  // an expert are read for the first time there, from L3 or memory: those
  // tiles took 1.8x as long as later groups' (INT8 down, Qwen3-30B-A3B at
  // 2048 tokens, 2 threads, TSC cycles per tile), 1.1x with the prefetch.
  const char* pf_acts;
  size_t pf_acts_last;
};

// The L2 variant's prefetches at step `step` (weight bytes `wo` into the
// block): line wo of pf_line, and line min(step, pf_acts_last) of pf_acts.
// Every format's k loop calls this one helper. The activation line is an asm
// statement, not _mm_prefetch: GCC 12 dropped that prefetch from the tiles'
// k loops altogether (as an `if (i < lines)` and as a clamped index alike;
// seen in the disassembly), and the tiles ran as if it were absent.
static inline void l2_step_prefetches(const Streams& s, size_t wo, size_t step) {
  _mm_prefetch(reinterpret_cast<const char*>(s.pf_line + wo), kGemmPrefetchHint);
  const char* line = s.pf_acts + (step < s.pf_acts_last ? step : s.pf_acts_last) * 64;
  __asm__ volatile("prefetcht1 %0" : : "m"(*line));
}

// GEMV prefetch offset for the step at byte offset wo of a block.
static inline ptrdiff_t gemv_prefetch_offset(const Streams& s, size_t wo) {
  const size_t po = wo + s.pf_dist;
  return ptrdiff_t(po) + (po >= s.block_bytes ? s.pf_jump : 0);
}

struct Tokens {
  const uint8_t* act[kMaxTileTokens];       // activation row (already at the view's column offset)
  float scale[kMaxTileTokens];              // INT8 / INT4: the row's scale
  const int32_t* sums[kMaxTileTokens];      // INT4: the row's per-32 sums
  // Where the results go (emit_tile): gate/up tiles write them to `res`;
  // down tiles (to_rows) add them into the tokens' output rows.
  bool to_rows;
  float* out[kMaxTileTokens];   // down: the token's output row at the tile's first block
  float weight[kMaxTileTokens];  // down: the token's routing weight
  __mmask16 rows[kMaxStreams];   // down: lanes of stream j's block that are real output rows
};

// A tile's results: v[j][t] is the 16 fp32 results of stream j and token t.
// gate/up: into res, where drive's epilogue pairs each gate block with its
// up block. down: out[t] += weight[t] * v, a multiply then an add as the
// reference does, straight from the tile (INT8 down alone, 1 core: +2.5% at
// K = 768, +1% at K = 1408 over a round trip through res; at short K the
// per-tile epilogue is a visible share of the tile). One branch per tile,
// not per result, so each path is straight-line code. (An array, not a
// callback: a lambda capturing the accumulators by reference made GCC keep
// them in memory through the k loop.)
template <int NS, int MT>
__attribute__((always_inline)) static inline void emit_tile(const Tokens& tk, float* res, const __m512 (&v)[NS][MT]) {
  if (!tk.to_rows) {
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) _mm512_store_ps(res + (j * MT + t) * 16, v[j][t]);
    return;
  }
  float* out[MT];
  __m512 weight[MT];
#pragma GCC unroll 64
  for (int t = 0; t < MT; ++t) {
    out[t] = tk.out[t];
    weight[t] = _mm512_set1_ps(tk.weight[t]);
  }
#pragma GCC unroll 64
  for (int j = 0; j < NS; ++j) {
    const __mmask16 m = tk.rows[j];
#pragma GCC unroll 64
    for (int t = 0; t < MT; ++t) {
      float* o = out[t] + j * kRowBlock;
      const __m512 x = _mm512_mul_ps(weight[t], v[j][t]);
      if (m == __mmask16(0xffff))
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), x));
      else
        _mm512_mask_storeu_ps(o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), x));
    }
  }
}

using TileFn = void (*)(const Streams&, const Tokens&, float* res);

// The k loop of the 4-k-per-step tiles (INT8 u8 x s8 with vpdpbusd, BF16
// with vdpbf16ps): steps [i0, i1) of NS weight streams against MT broadcast
// activation quads, each weight step loaded once for all tokens, consecutive
// steps going round-robin to KS accumulator sets (i1 - i0 is a multiple of
// KS). Dot supplies the accumulator type and the dot instruction.
struct DotU8S8 {
  using Acc = __m512i;
  static inline Acc zero() { return _mm512_setzero_si512(); }
  static inline Acc dot(Acc acc, __m512i act, __m512i w) { return _mm512_dpbusd_epi32(acc, act, w); }
};
struct DotBf16 {
  using Acc = __m512;
  static inline Acc zero() { return _mm512_setzero_ps(); }
  static inline Acc dot(Acc acc, __m512i act, __m512i w) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)act); }
};

template <class Dot, int KS, int NS, int MT>
static inline void zero_acc(typename Dot::Acc (&acc)[KS][NS][MT]) {
#pragma GCC unroll 64
  for (int c = 0; c < KS; ++c)
#pragma GCC unroll 64
    for (int j = 0; j < NS; ++j)
#pragma GCC unroll 64
      for (int t = 0; t < MT; ++t) acc[c][j][t] = Dot::zero();
}

// Local copies of a tile's stream and token pointers (kept in registers
// through the k loop).
template <int NS, int MT>
static inline void tile_pointers(const Streams& s, const Tokens& tk, const uint8_t* (&w)[NS], const uint8_t* (&a)[MT]) {
#pragma GCC unroll 64
  for (int j = 0; j < NS; ++j) w[j] = s.w[j];
#pragma GCC unroll 64
  for (int t = 0; t < MT; ++t) a[t] = tk.act[t];
}

// Accumulator sets for a tile of NS x MT accumulators: with fewer than 8 the
// k loop would wait on the dot instruction's latency (decode with one
// stream), so consecutive steps go round-robin to KS sets, summed at the
// end. A block has a multiple of 16 steps (rows padded to 64 k), so KS (1, 2,
// 4 or 8) divides it.
template <int NS, int MT>
struct DotChains {
  static constexpr int kKS = NS * MT >= 8 ? 1 : (NS * MT >= 4 ? 2 : (NS * MT >= 2 ? 4 : 8));
};

// Streaming tiles of two streams or more (GEMV gate/up: a gate and an up
// block) and one token read their streams in bursts: kBurstSteps
// consecutive steps (512 bytes) of one stream, then of the next, with one
// prefetch per burst, instead of a line of each stream in turn with a
// prefetch per line. In the host's fast state, where each core reads at its
// own limit, bursts are what a core streams best: a C++ loop reading the
// decode pattern (2 pinned threads, random experts, two streams per gate/up
// task) read 74-78 GB/s in bursts against 63-70 line by line (line by line
// with a prefetch per 512 bytes: 64-66; bursts with a prefetch per line:
// 70-71); the library's read probe is a burst loop itself. 1-token calls,
// 2 threads, alternated in one process: DeepSeek-V2-Lite INT8 gate/up
// 653-661 us per call against 669-685 (~80 GB/s), Qwen3-30B-A3B INT8
// 335-340 against 351-355 in one fast-state episode and equal in another,
// ~1% faster at ~50 GB/s; one core (bench_kernels --gemv 1): INT8 gate/up
// 38.9-40.3 GB/s against 35.9-38.1 (the latter also without the INT8
// tiles' scale prefetch), BF16 40.1-41.2 against 38.8-39.6. With more
// tokens the bursts lose (each burst re-broadcasts the activations, and a
// stream alone has too few accumulators for the dot latency: INT8 at 4
// tokens 28.4 against 35.8 GB/s), and INT4 lost with bursts even at one
// token (gate/up 30-32 against 38-40 GB/s, one core; 37 with a prefetch per
// line in the bursts): both keep the line-by-line walk. Down's single
// stream (one block at a time, in memory order) keeps a prefetch per line:
// in bursts it was 1.5% slower at ~50 GB/s and no faster at ~80.
constexpr size_t kBurstSteps = 8;

template <class Dot, bool PF, int KS, int NS, int MT>
__attribute__((always_inline)) static inline void dot_steps(const Streams& s, const Tokens& tk, size_t i0, size_t i1,
                                                            typename Dot::Acc (&acc)[KS][NS][MT]) {
  const uint8_t* w[NS];
  const uint8_t* a[MT];
  tile_pointers(s, tk, w, a);
  // Bursts need whole bursts: every caller's range is a multiple of 8 steps
  // (blocks have a multiple of 16 steps, INT8 groups of 32 k are 8 steps),
  // and KS (1, 2, 4 or 8) divides kBurstSteps.
  if (PF && NS >= 2 && MT == 1 && s.bursts && (i1 - i0) % kBurstSteps == 0) {
    for (size_t i = i0; i < i1; i += kBurstSteps) {
#pragma GCC unroll 64
      for (int j = 0; j < NS; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(w[j] + gemv_prefetch_offset(s, i * kStepBytes)), _MM_HINT_T0);
#pragma GCC unroll 8
        for (size_t q = 0; q < kBurstSteps; ++q) {
          const size_t wo = (i + q) * kStepBytes, ao = (i + q) * 4;
          const __m512i wv = _mm512_loadu_si512(w[j] + wo);
#pragma GCC unroll 64
          for (int t = 0; t < MT; ++t) acc[q % KS][j][t] = Dot::dot(acc[q % KS][j][t], bcast32(a[t] + ao), wv);
        }
      }
    }
    return;
  }
  for (size_t i = i0; i < i1; i += KS) {
#pragma GCC unroll 8
    for (int ks = 0; ks < KS; ++ks) {
      const size_t wo = (i + ks) * kStepBytes, ao = (i + ks) * 4;
      const ptrdiff_t pfo = PF ? gemv_prefetch_offset(s, wo) : 0;
      if (!PF) l2_step_prefetches(s, wo, i + ks);
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
        for (int j = 0; j < NS; ++j) acc[ks][j][t] = Dot::dot(acc[ks][j][t], b, wv[j]);
      }
    }
  }
}

// Grouped formats keep a block's per-group numbers (scales, mins,
// compensation: [blocks][groups][16], a line per group) in arrays of their
// own, a slow stream beside the weights. Streaming tiles prefetch line
// g + kGroupLinesAhead of such an array while on group g, running on into
// the next block's lines (INT4 gate/up at 1 token, 1 core: +8%; grouped
// INT8, bench_kernels --format int8_g32,int8_g128 --gemv 1 --shape
// 768x2048, 1 core: gate/up 35.6-38.6 -> 39.1-40.4 GB/s, down 30.5-32.3 ->
// 32.8-34.4).
constexpr size_t kGroupLinesAhead = 4;

template <class T>
static inline void prefetch_group_line_ahead(const T* per_group, size_t g) {
  _mm_prefetch(reinterpret_cast<const char*>(per_group + (g + kGroupLinesAhead) * kRowBlock), _MM_HINT_T0);
}

// Run-time (streams, tokens) -> the tile kernel instantiated for them.
// K<NS, MT, PF>::run is a format's tile kernel for NS streams and MT
// tokens; PF selects the variant that streams its weights from memory (each
// stream prefetched ahead, see Streams) over the one that reads them from
// L2 (one line of the next tile's weights prefetched per step).
template <template <int, int, bool> class K, bool PF, int NS, int MT>
struct SelectMT {
  static TileFn get(size_t mt) { return mt == size_t(MT) ? &K<NS, MT, PF>::run : SelectMT<K, PF, NS, MT - 1>::get(mt); }
};
template <template <int, int, bool> class K, bool PF, int NS>
struct SelectMT<K, PF, NS, 0> {
  static TileFn get(size_t) { return nullptr; }
};
template <template <int, int, bool> class K, bool PF, int NS, int MT>
struct SelectTile {
  static TileFn get(size_t ns, size_t mt) {
    return ns == size_t(NS) ? SelectMT<K, PF, NS, MT>::get(mt) : SelectTile<K, PF, NS - 1, MT>::get(ns, mt);
  }
};
template <template <int, int, bool> class K, bool PF, int MT>
struct SelectTile<K, PF, 0, MT> {
  static TileFn get(size_t, size_t) { return nullptr; }
};
using SelectFn = TileFn (*)(size_t ns, size_t mt);

// How a kernel walks the blocks and tokens: GEMV keeps every token in one
// tile (one pass over the weights, prefetching ahead); GEMM cuts them into
// tiles of `tile_tokens` and reuses each group of blocks' weights from cache.
struct TilePlan {
  SelectFn first;      // the first token tile of a group of blocks (streams from memory)
  SelectFn rest;       // later token tiles (weights in L2)
  size_t blocks;       // row blocks per tile and matrix (gate/up: blocks of each)
  size_t tile_tokens;  // activation rows per tile
  size_t pf_dist = kPrefetchBytes;  // prefetch distance of the streaming variant
  // GEMV: one-token tiles of two streams or more read each stream in bursts
  // of kBurstSteps consecutive steps, prefetched once per burst (dot_steps).
  bool bursts = false;
};

// A GEMM's m tokens cut into ceil(m / T) tiles as even as they go (sizes
// differ by one at most) rather than full tiles and a remainder: 128 tokens
// in tiles of 6 make 18 of 6 and 4 of 5, not 21 of 6 and one of 2, which
// reads the same weights as a full tile for a third of the work. 512-token
// calls, 2 threads, alternated call by call (40 each): Qwen3-30B-A3B INT8
// 23.18 / 22.18 ms against 23.48 / 22.49, INT4 25.34 / 25.05 against 25.76
// / 25.52, DeepSeek-V2-Lite INT8 29.09 / 28.35 against 29.26 / 28.61; at
// 2048 tokens within 0.5% either way (more tokens per expert, a smaller
// share in the last tile). Only drive builds it, past its m == 0 return.
struct TokenTiles {
  size_t base, longer;  // every tile has base tokens, the first `longer` one more
  TokenTiles(size_t m, size_t t) {
    const size_t n = (m + t - 1) / t;
    base = m / n;
    longer = m % n;
  }
  size_t size(size_t tile) const { return base + (tile < longer ? 1 : 0); }
};

static inline void fill_tokens(const ActsView& a, size_t t0, size_t mt, Tokens* tk) {
  for (size_t t = 0; t < mt; ++t) {
    const size_t r = a.row_index ? size_t(a.row_index[t0 + t]) : t0 + t;
    tk->act[t] = a.data + r * a.row_bytes;
    tk->scale[t] = a.row_scale ? a.row_scale[r] : 0.0f;
    tk->sums[t] = a.group_sums ? a.group_sums + r * a.group_sums_stride : nullptr;
  }
}

static inline void set_stream(const PackedMatrixView& w, size_t b, size_t j, Streams* s) {
  const PackedGeometry& g = w.geo;
  s->w[j] = w.weights + b * g.block_weight_bytes;
  const size_t groups = g.groups ? g.groups : 1;
  s->scales[j] = w.scales ? w.scales + b * groups * kRowBlock : nullptr;
  s->mins[j] = w.mins ? w.mins + b * groups * kRowBlock : nullptr;
  s->comp[j] = w.compensation ? w.compensation + b * groups * kRowBlock : nullptr;  // INT8: groups = 1
}

static inline void set_geometry(const PackedMatrixView& w, Streams* s) {
  const PackedGeometry& g = w.geo;
  const size_t kps = scheme_k_per_step(w.scheme);
  s->steps = g.cols_padded / kps;
  s->groups = g.groups ? g.groups : 1;
  s->group_steps = g.group_size ? g.group_size / kps : s->steps;
  s->sums_per_group = g.group_size / kActSumGroup;
  s->block_bytes = g.block_weight_bytes;
}

// Walks row blocks [bb, be) of `nmats` matrices of one geometry (gate and
// up, or down alone) in groups of plan.blocks blocks per matrix; the
// streams of a group's tiles are blocks [b, b + nb) of matrix 0, then of
// matrix 1, and its token tiles follow one another over the same blocks.
// epi(b, nb, t0, mt, res) consumes each tile's results written to res.
// pre(b, nb, t0, mt, &tk) runs before each tile (down: points the tile at the
// output rows it adds into, and prefetches them).
template <class Pre, class Epilogue>
static inline void drive(const TilePlan& plan, const PackedMatrixView* mats, size_t nmats, size_t bb, size_t be,
                         const ActsView& a, Pre pre, Epilogue epi) {
  const size_t m = a.rows;
  if (m == 0 || bb >= be) return;
  Streams s;
  set_geometry(mats[0], &s);
  s.pf_dist = plan.pf_dist;
  s.bursts = plan.bursts;
  Tokens tk;
  tk.to_rows = false;
  alignas(64) float res[kMaxStreams * kMaxTileTokens * 16];
  const size_t bytes = s.block_bytes;
  for (size_t b = bb; b < be; b += plan.blocks) {
    const size_t nb = min_sz(plan.blocks, be - b);
    const size_t ns = nmats * nb;
    for (size_t mi = 0; mi < nmats; ++mi)
      for (size_t j = 0; j < nb; ++j) set_stream(mats[mi], b + j, mi * nb + j, &s);
    // The next group's blocks: stream j's successor is nb blocks further in
    // the same matrix; with no next group, prefetches fall back on the
    // block itself (already cached).
    const size_t next_nb = b + nb < be ? min_sz(plan.blocks, be - b - nb) : 0;
    s.pf_jump = next_nb ? ptrdiff_t((nb - 1) * bytes) : -ptrdiff_t(bytes);
    // Where token tiles k >= 1 warm the blocks read next: the next group of
    // this call, or after the last group the first group of the matrix the
    // caller runs next (next_weights: down's next expert), which would
    // otherwise start cold (INT8 down alone at one group per call, 1 core:
    // +5%, bench_kernels --next-hint 0|1).
    const uint8_t* warm_base[2] = {mats[0].weights, nmats > 1 ? mats[1].weights : nullptr};
    size_t warm_b = b + nb, warm_nb = next_nb;
    if (!next_nb && nmats == 1 && mats[0].next_weights) {
      warm_base[0] = mats[0].next_weights;
      warm_b = bb;
      warm_nb = min_sz(plan.blocks, be - bb);
    }
    const TokenTiles tiles(m, plan.tile_tokens);
    for (size_t t0 = 0, tile = 0; t0 < m; t0 += tiles.size(tile), ++tile) {
      const size_t mt = tiles.size(tile);
      // The first token tile streams the blocks from memory with GEMV
      // prefetching; token tile k >= 1 warms block k - 1 of the next group.
      s.pf_line = s.w[0];
      if (warm_nb && tile) {
        const size_t k = (tile - 1) % (nmats * warm_nb);
        s.pf_line = warm_base[k / warm_nb] + (warm_b + k % warm_nb) * bytes;
      }
      fill_tokens(a, t0, mt, &tk);
      s.pf_acts = reinterpret_cast<const char*>(tk.act[0]);
      s.pf_acts_last = 0;
      if (b == bb && !a.row_index && t0 + mt < m) {
        const size_t next_mt = tiles.size(tile + 1);
        s.pf_acts = reinterpret_cast<const char*>(a.data + (t0 + mt) * a.row_bytes);
        s.pf_acts_last = min_sz(s.steps, (next_mt * a.row_bytes + 63) / 64) - 1;
      }
      pre(b, nb, t0, mt, &tk);
      (tile ? plan.rest : plan.first)(ns, mt)(s, tk, res);
      epi(b, nb, t0, mt, res);
    }
  }
}

// gate/up: h = act(gate, up) for row blocks [bb, be).
static inline void drive_gate_up(const TilePlan& plan, const PackedMatrixView& gate, const PackedMatrixView& up,
                                 size_t bb, size_t be, const ActsView& a, const ActivationParams& p, float* h,
                                 size_t ldh) {
  const Act512 act = make_act512(p);
  const size_t rows = gate.geo.rows;
  const PackedMatrixView mats[2] = {gate, up};
  auto no_pre = [](size_t, size_t, size_t, size_t, Tokens*) {};
  drive(plan, mats, 2, bb, be, a, no_pre, [&](size_t b, size_t nb, size_t t0, size_t mt, const float* res) {
    for (size_t j = 0; j < nb; ++j) {
      const size_t n0 = (b + j) * kRowBlock;
      const __mmask16 mask = rows_mask(n0, rows);
      for (size_t t = 0; t < mt; ++t) {
        const __m512 g = _mm512_load_ps(res + (j * mt + t) * 16);
        const __m512 u = _mm512_load_ps(res + ((nb + j) * mt + t) * 16);
        _mm512_mask_storeu_ps(h + (t0 + t) * ldh + n0, mask, activation512(g, u, act));
      }
    }
  });
}

// down: out_rows[m][n] += row_weight[m] * v for row blocks [bb, be); the
// tiles add their results into the rows themselves (emit_tile).
static inline void drive_down(const TilePlan& plan, const PackedMatrixView& w, size_t bb, size_t be,
                              const ActsView& a, const float* row_weight, float* const* out_rows) {
  const size_t rows = w.geo.rows;
  // Prefill: the rows are spread over the whole output (one per token of
  // the expert) and long out of cache by the time the next expert adds into
  // them; prefetched while the tile computes, their read-modify-write costs
  // little (INT8 down at 1024 tokens, 1 thread: 32.6 -> 30.6 ms).
  auto pre = [&](size_t b, size_t nb, size_t t0, size_t mt, Tokens* tk) {
    tk->to_rows = true;
    for (size_t j = 0; j < nb; ++j) tk->rows[j] = rows_mask((b + j) * kRowBlock, rows);
    for (size_t t = 0; t < mt; ++t) {
      float* o = out_rows[t0 + t] + b * kRowBlock;
      tk->out[t] = o;
      tk->weight[t] = row_weight[t0 + t];
      for (size_t j = 0; j < nb; ++j) _mm_prefetch(reinterpret_cast<const char*>(o + j * kRowBlock), _MM_HINT_T0);
    }
  };
  auto no_epilogue = [](size_t, size_t, size_t, size_t, const float*) {};
  drive(plan, &w, 1, bb, be, a, pre, no_epilogue);
}

}  // namespace
}  // namespace avx512
}  // namespace kt
