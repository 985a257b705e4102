// Private machinery of the AMX kernels, shared by their translation units:
// the tile geometry, the activation panel (gathered, zero-padded token rows),
// the 2 x 2 tile macro step, and the gated activation of the gate/up
// epilogue.
//
// Everything has internal linkage (anonymous namespace inside kt::KT_AMX_NS)
// and nothing from <algorithm>, <vector> or other std templates is used: this
// header is compiled with AMX flags and at baseline flags (KT_AMX_EMULATE),
// and neither build may emit COMDAT code (see types.h).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "amx/tile.h"
#include "kt_kernel/kernel_table.h"
#include "kt_kernel/packed_matrix.h"

#ifndef KT_AMX_EMULATE
#include "avx512/avx512_common.h"
#endif

namespace kt {
namespace KT_AMX_NS {
namespace {

// ---------------------------------------------------------------------------
// Geometry.
//
// Eight tile registers, each 16 rows x 64 bytes (1 KiB). One "macro step"
// multiplies two A tiles (32 activation rows) by two B tiles (2 weight
// streams of 16 output columns) into four C tiles:
//   tmm0..tmm3  C[i][j] = A_i x B_j, 16 tokens x 16 columns of int32 / fp32
//   tmm4, tmm5  A_0, A_1: tokens 0-15 / 16-31 of the pass, 64 bytes of K
//   tmm6, tmm7  B_0, B_1: one weight stream each, 16 rows of 64 bytes
// Each loaded tile feeds two dot products (2 A + 2 B loads per 4 tdp*), the
// most reuse the 8-register file allows with four accumulators.
//
// K per tile follows from 64 bytes per A row: 64 int8 (tdpbusd / tdpbsud) or
// 32 bf16 (tdpbf16ps). The packed layout's 64-byte step is one B-tile row
// (16 columns x 4 int8 / x 2 bf16), so an int8 or bf16 B tile is simply 16
// consecutive steps (1 KiB, stride 64) read in place; INT4 steps unpack into
// two B rows each (low nibbles: k0..k0+3; high: k0+4..k0+7).
//
// Streams: down uses two consecutive row blocks of w; gate/up uses the gate
// and up blocks of the same columns, so the epilogue finds both in C.
//
// Cache blocking: a pass gathers its 32 activation rows for the full K into
// the panel (32 x K bytes, x2 for BF16: 32-448 KiB for K = 1-7 Ki), which
// then stays in L2 while every row block of the call streams its weights
// past it once per pass.
enum : int { kTmmC00 = 0, kTmmC01 = 1, kTmmC10 = 2, kTmmC11 = 3, kTmmA0 = 4, kTmmA1 = 5, kTmmB0 = 6, kTmmB1 = 7 };

constexpr size_t kTileRows = 16;                         // rows of every tile we use
constexpr size_t kTileRowBytes = 64;                     // colsb of a full tile
constexpr size_t kTileBytes = kTileRows * kTileRowBytes; // 1 KiB
constexpr size_t kPassTokens = 2 * kTileRows;            // activation rows per pass (two A tiles)
constexpr size_t kI8PerTile = kTileRowBytes;             // k per int8 A-tile row
constexpr size_t kBf16PerTile = kTileRowBytes / 2;       // k per bf16 A-tile row
constexpr size_t kI4GroupTile = 32;                      // k per INT4 tile when the group is 32

static_assert(kTileRows == kRowBlock, "a C tile's 16 columns are one packed row block");
static_assert(kTileRowBytes == kStepBytes, "a B-tile row is one packed step");
static_assert(kI8PerTile == kColPad, "K padding is whole int8 tiles");

// The tile configuration of every kernel: all eight tiles 16 rows; A tiles
// a_colsb bytes wide (64, or 32 for INT4 group-32 tiles), B tiles a_colsb / 4
// rows (one per 4-byte group of A), C and B tiles 64 bytes wide.
static inline TileConfig make_config(size_t a_colsb) {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette_id = kTilePalette;
  for (int t = kTmmC00; t <= kTmmC11; ++t) {
    c.rows[t] = uint8_t(kTileRows);
    c.colsb[t] = uint16_t(kTileRowBytes);
  }
  for (int t = kTmmA0; t <= kTmmA1; ++t) {
    c.rows[t] = uint8_t(kTileRows);
    c.colsb[t] = uint16_t(a_colsb);
  }
  for (int t = kTmmB0; t <= kTmmB1; ++t) {
    c.rows[t] = uint8_t(a_colsb / 4);
    c.colsb[t] = uint16_t(kTileRowBytes);
  }
  return c;
}

static inline size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

static inline size_t act_row(const ActsView& a, size_t m) { return a.row_index ? size_t(a.row_index[m]) : m; }

// ---------------------------------------------------------------------------
// The activation panel: up to kPassTokens rows of `row_bytes` (the packed K
// in activation bytes), gathered through row_index, rows past the pass
// zero-filled so tile loads always see 16 full rows. 64-byte aligned heap
// memory owned by the kernel call, returned by release().
//
// No destructors here or in the kernels (explicit release, and tile_release
// at the end of each call): a destructor would need an unwinding landing pad,
// which references the C++ personality routine through a weak
// (DW.ref.__gxx_personality_v0) symbol, and ISA objects must define none.
class Panel {
 public:
  explicit Panel(size_t row_bytes) : row_bytes_(row_bytes) {
    data_ = static_cast<uint8_t*>(std::aligned_alloc(64, round_up(kPassTokens * row_bytes, 64)));
    if (!data_) std::abort();  // a few hundred KiB at most; nothing sensible to do without it
  }
  void release() {
    std::free(data_);
    data_ = nullptr;
  }

  // Rows [t0, t0 + mt) of the view; returns the number of A tiles (1 or 2).
  size_t gather(const ActsView& a, size_t t0, size_t mt) {
    const size_t tiles = mt > kTileRows ? 2 : 1;
    for (size_t t = 0; t < mt; ++t)
      std::memcpy(data_ + t * row_bytes_, a.data + act_row(a, t0 + t) * a.row_bytes, row_bytes_);
    std::memset(data_ + mt * row_bytes_, 0, (tiles * kTileRows - mt) * row_bytes_);
    return tiles;
  }

  const uint8_t* data() const { return data_; }
  size_t stride() const { return row_bytes_; }

 private:
  uint8_t* data_;
  size_t row_bytes_;
};

// ---------------------------------------------------------------------------
// Dot-product flavours, as template arguments of the macro step.
struct DotBusd {  // u8 activations x s8 weights (INT8)
  template <int C, int A, int B>
  static void run() { tile_dpbusd<C, A, B>(); }
};
struct DotBsud {  // s8 activations x u8 weights (INT4 nibbles)
  template <int C, int A, int B>
  static void run() { tile_dpbsud<C, A, B>(); }
};
struct DotBf16 {  // bf16 x bf16 -> fp32
  template <int C, int A, int B>
  static void run() { tile_dpbf16ps<C, A, B>(); }
};

static inline void zero_c() {
  tile_zero<kTmmC00>();
  tile_zero<kTmmC01>();
  tile_zero<kTmmC10>();
  tile_zero<kTmmC11>();
}

// C[i][j] += A_i x B_j for A tiles at `a` (rows 0-15) and a + 16 * a_stride
// (rows 16-31, when a_tiles == 2), B tiles at b0 and b1 (b1 may be null: one
// stream only).
template <class Dot>
static inline void macro_step(const uint8_t* a, size_t a_stride, size_t a_tiles, const uint8_t* b0,
                              const uint8_t* b1, size_t b_stride) {
  tile_load<kTmmA0>(a, a_stride);
  tile_load<kTmmB0>(b0, b_stride);
  Dot::template run<kTmmC00, kTmmA0, kTmmB0>();
  if (a_tiles > 1) {
    tile_load<kTmmA1>(a + kTileRows * a_stride, a_stride);
    Dot::template run<kTmmC10, kTmmA1, kTmmB0>();
  }
  if (b1) {
    tile_load<kTmmB1>(b1, b_stride);
    Dot::template run<kTmmC01, kTmmA0, kTmmB1>();
    if (a_tiles > 1) Dot::template run<kTmmC11, kTmmA1, kTmmB1>();
  }
}

// The C tiles in memory: c[i * 2 + j][row][col], i = A tile, j = stream.
template <class T>
struct CTiles {
  alignas(64) T v[4][kTileRows][kTileRows];
};

template <class T>
static inline void store_c(CTiles<T>* c, size_t a_tiles, bool two_streams) {
  const size_t ld = kTileRows * sizeof(T);
  tile_store<kTmmC00>(c->v[0], ld);
  if (two_streams) tile_store<kTmmC01>(c->v[1], ld);
  if (a_tiles > 1) {
    tile_store<kTmmC10>(c->v[2], ld);
    if (two_streams) tile_store<kTmmC11>(c->v[3], ld);
  }
}

// The C value for token t of the pass (0..31), stream j, column n.
template <class T>
static inline T c_at(const CTiles<T>& c, size_t t, size_t j, size_t n) {
  return c.v[(t / kTileRows) * 2 + j][t % kTileRows][n];
}

// Output columns of row block b that exist (n < rows).
static inline size_t valid_cols(size_t b, size_t rows) {
  const size_t n0 = b * kRowBlock;
  return rows > n0 ? min_sz(kRowBlock, rows - n0) : 0;
}

// ---------------------------------------------------------------------------
// The gated activation of ActivationParams over `n` <= 16 columns:
// out[i] = act(g[i], u[i]).
#ifdef KT_AMX_EMULATE
// Scalar, the reference's fp32 operation sequence and libm expf: bit-exact.
static inline void activation_cols(const float* g, const float* u, size_t n, const ActivationParams& p, float* out) {
  for (size_t i = 0; i < n; ++i) {
    if (p.swiglu_limit <= 0.0f) {
      out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    } else {
      const float lim = p.swiglu_limit;  // clamps that keep a NaN, as the reference's
      const float gl = g[i] > lim ? lim : g[i];
      const float ul = u[i] > lim ? lim : (u[i] < -lim ? -lim : u[i]);
      out[i] = gl / (1.0f + expf(-p.swiglu_alpha * gl)) * (ul + 1.0f);
    }
  }
}
#else
// 16 lanes with the AVX-512 backend's vector exp (within ~1 ulp of expf).
static inline void activation_cols(const float* g, const float* u, size_t n, const ActivationParams& p, float* out) {
  const __mmask16 m = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
  const avx512::Act512 act = avx512::make_act512(p);
  const __m512 h = avx512::activation512(_mm512_maskz_loadu_ps(m, g), _mm512_maskz_loadu_ps(m, u), act);
  _mm512_mask_storeu_ps(out, m, h);
}
#endif

}  // namespace
}  // namespace KT_AMX_NS
}  // namespace kt
