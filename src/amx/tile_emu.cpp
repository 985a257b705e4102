// Software model of the AMX tile unit (palette 1: eight tiles of 16 rows x
// 64 bytes), one per thread, for the "amx-emu" build of the AMX kernels.
// It follows the SDM pseudocode of LDTILECFG / TILELOADD / TILESTORED /
// TILEZERO / TDPB[SU][SU]D / TDPBF16PS; tile.h states the semantics. Only the
// emulated build (KT_AMX_EMULATE) compiles anything here.
#ifdef KT_AMX_EMULATE

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "amx/tile.h"

namespace kt {
namespace amx_emu {
namespace {

constexpr size_t kTileBytes = size_t(kTileMaxRows) * kTileMaxColsb;  // 1 KiB per tile register

struct TileUnit {
  bool configured;
  uint8_t rows[kNumTiles];
  uint16_t colsb[kNumTiles];
  alignas(64) uint8_t data[kNumTiles][kTileBytes];
};

// Zero-initialised (constant initialisation: no TLS init function).
thread_local TileUnit t_unit;

[[noreturn]] void fault(const char* what, int t) {
  std::fprintf(stderr, "kt_kernel amx-emu: %s (tile %d): the real instruction would raise #UD\n", what, t);
  std::abort();
}

TileUnit& unit_for(int t) {
  TileUnit& u = t_unit;
  if (!u.configured) fault("tile instruction before ldtilecfg", t);
  if (t < 0 || t >= kNumTiles) fault("tile index out of range", t);
  if (u.rows[t] == 0 || u.colsb[t] == 0) fault("tile not configured", t);
  return u;
}

uint32_t f32_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float bits_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Denormal -> signed zero (DAZ on inputs, FTZ on results).
float flush(float x) {
  const uint32_t b = f32_bits(x);
  return (b & 0x7f800000u) == 0 ? bits_f32(b & 0x80000000u) : x;
}

float bf16_daz(const uint8_t* p) {
  const uint32_t h = uint32_t(p[0]) | uint32_t(p[1]) << 8;
  return flush(bits_f32(h << 16));
}

int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void store_i32(uint8_t* p, int32_t v) { std::memcpy(p, &v, 4); }

float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

void store_f32(uint8_t* p, float v) { std::memcpy(p, &v, 4); }

// Sum of the four byte products of one 4-byte group, signedness per operand.
int32_t dot4(const uint8_t* a, bool a_signed, const uint8_t* b, bool b_signed) {
  int32_t s = 0;
  for (int i = 0; i < 4; ++i) {
    const int32_t x = a_signed ? int32_t(int8_t(a[i])) : int32_t(a[i]);
    const int32_t y = b_signed ? int32_t(int8_t(b[i])) : int32_t(b[i]);
    s += x * y;  // |s| <= 4 * 255 * 255: no overflow
  }
  return s;
}

}  // namespace

void emu_tile_config(const TileConfig& cfg) {
  TileUnit& u = t_unit;
  if (cfg.palette_id != kTilePalette) fault("only palette 1 is modelled", -1);
  if (cfg.start_row != 0) fault("start_row must be 0", -1);
  for (int t = 0; t < kNumTiles; ++t) {
    if (cfg.rows[t] > kTileMaxRows || cfg.colsb[t] > kTileMaxColsb) fault("tile shape beyond palette 1", t);
    if ((cfg.rows[t] == 0) != (cfg.colsb[t] == 0)) fault("tile with rows but no columns (or the reverse)", t);
  }
  for (int t = kNumTiles; t < 16; ++t)
    if (cfg.rows[t] || cfg.colsb[t]) fault("palette 1 has only 8 tiles", t);
  u.configured = true;
  for (int t = 0; t < kNumTiles; ++t) {
    u.rows[t] = cfg.rows[t];
    u.colsb[t] = cfg.colsb[t];
  }
  std::memset(u.data, 0, sizeof(u.data));  // ldtilecfg zeroes the tile data
}

void emu_tile_release() {
  TileUnit& u = t_unit;
  u.configured = false;
  std::memset(u.rows, 0, sizeof(u.rows));
  std::memset(u.colsb, 0, sizeof(u.colsb));
  std::memset(u.data, 0, sizeof(u.data));
}

void emu_tile_load(int t, const void* base, size_t stride) {
  TileUnit& u = unit_for(t);
  const uint8_t* src = static_cast<const uint8_t*>(base);
  uint8_t* dst = u.data[t];
  std::memset(dst, 0, kTileBytes);
  for (size_t r = 0; r < u.rows[t]; ++r) std::memcpy(dst + r * kTileMaxColsb, src + r * stride, u.colsb[t]);
}

void emu_tile_store(int t, void* base, size_t stride) {
  TileUnit& u = unit_for(t);
  uint8_t* dst = static_cast<uint8_t*>(base);
  for (size_t r = 0; r < u.rows[t]; ++r) std::memcpy(dst + r * stride, u.data[t] + r * kTileMaxColsb, u.colsb[t]);
}

void emu_tile_zero(int t) {
  TileUnit& u = unit_for(t);
  std::memset(u.data[t], 0, kTileBytes);
}

void emu_tile_dot(EmuDot op, int c, int a, int b) {
  TileUnit& u = unit_for(c);
  unit_for(a);
  unit_for(b);
  if (c == a || c == b || a == b) fault("tile dot product with aliased operands", c);
  const size_t M = u.rows[c], N = u.colsb[c] / 4u, K = u.colsb[a] / 4u;
  if (u.colsb[c] % 4 || u.colsb[a] % 4) fault("colsb not a multiple of 4", c);
  if (u.rows[a] != M) fault("A rows != C rows", a);
  if (u.rows[b] != K) fault("B rows != A colsb / 4", b);
  if (u.colsb[b] != u.colsb[c]) fault("B colsb != C colsb", b);

  // Work on a copy: rows of C beyond M and bytes beyond colsb end up zero.
  alignas(64) uint8_t out[kTileBytes] = {};
  const uint8_t* A = u.data[a];
  const uint8_t* B = u.data[b];
  const uint8_t* C = u.data[c];
  if (op == EmuDot::kBf16ps) {
    for (size_t m = 0; m < M; ++m)
      for (size_t n = 0; n < N; ++n) {
        float acc = flush(load_f32(C + m * kTileMaxColsb + 4 * n));
        for (size_t k = 0; k < K; ++k) {
          const uint8_t* ap = A + m * kTileMaxColsb + 4 * k;
          const uint8_t* bp = B + k * kTileMaxColsb + 4 * n;
          for (size_t e = 0; e < 2; ++e) {  // even element first, then odd
            const float p = flush(bf16_daz(ap + 2 * e) * bf16_daz(bp + 2 * e));
            acc = flush(acc + p);
          }
        }
        store_f32(out + m * kTileMaxColsb + 4 * n, acc);
      }
  } else {
    const bool as = op == EmuDot::kBsud || op == EmuDot::kBssd;
    const bool bs = op == EmuDot::kBusd || op == EmuDot::kBssd;
    for (size_t m = 0; m < M; ++m)
      for (size_t n = 0; n < N; ++n) {
        uint32_t acc = uint32_t(load_i32(C + m * kTileMaxColsb + 4 * n));
        for (size_t k = 0; k < K; ++k)
          acc += uint32_t(dot4(A + m * kTileMaxColsb + 4 * k, as, B + k * kTileMaxColsb + 4 * n, bs));
        store_i32(out + m * kTileMaxColsb + 4 * n, int32_t(acc));
      }
  }
  std::memcpy(u.data[c], out, kTileBytes);
}

}  // namespace amx_emu
}  // namespace kt

#endif  // KT_AMX_EMULATE
