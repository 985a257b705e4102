// The AMX tile unit behind one thin interface, so the same kernel source
// compiles to the real instructions (backend "amx") or, with KT_AMX_EMULATE,
// to a software model of the eight tile registers (backend "amx-emu", built
// at baseline flags, run by the tests on any CPU).
//
// Interface (tile numbers are template arguments: the real instructions encode
// them in the opcode, so they must be compile-time constants):
//   tile_config(cfg)               ldtilecfg: palette 1, rows / colsb per tile
//   tile_release()                 tilerelease: tiles back to the init state
//   tile_load<T>(ptr, stride)      tileloadd: rows[T] rows of colsb[T] bytes
//   tile_store<T>(ptr, stride)     tilestored
//   tile_zero<T>()                 tilezero
//   tile_dpbusd<C, A, B>()         C.i32 += u8(A) . s8(B), 4-byte groups
//   tile_dpbsud<C, A, B>()         C.i32 += s8(A) . u8(B)
//   tile_dpbssd<C, A, B>()         C.i32 += s8(A) . s8(B)
//   tile_dpbf16ps<C, A, B>()       C.f32 += bf16(A) . bf16(B), pairs
// Shapes as in the SDM: A is M rows x K groups (colsb = 4 K), B is K rows x N
// groups (colsb = 4 N), C is M rows x N dwords: C[m][n] += sum_k A[m][k] . B[k][n].
//
// Emulation semantics (src/amx/tile_emu.cpp), per the SDM pseudocode:
//   * int8: each 4-byte group's four products are summed and added to the
//     int32 accumulator with wraparound (mod 2^32);
//   * bf16: for each k in order, C += a[2k] * b[2k], then C += a[2k+1] * b[2k+1],
//     each product exact (bf16 x bf16 fits fp32), each add rounded to nearest
//     even; denormal inputs (bf16 operands and the fp32 accumulator) are read as
//     zero and denormal results (products and sums) are flushed to zero, as
//     the instruction ignores MXCSR;
//   * loads zero the bytes past colsb and the rows past rows; a dot product
//     writes C's rows and zeroes the rest of the tile;
//   * shape mismatches, unconfigured tiles or aliased operands (a #UD on real
//     hardware) abort with a message.
//
// Every symbol lives in kt::KT_AMX_NS (amx_hw or amx_emu) or has internal
// linkage: the two builds of src/amx must never share a definition, and the
// AMX-flag build must not emit COMDAT code that baseline code could pick up.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef KT_AMX_EMULATE
#define KT_AMX_NS amx_emu
#else
#define KT_AMX_NS amx_hw
// As in avx512_common.h: GCC 12 reports the intrinsic headers' deliberately
// undefined pass-through operands as uninitialised once inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace kt {
namespace KT_AMX_NS {

constexpr int kNumTiles = 8;          // tmm0..tmm7
constexpr int kTileMaxRows = 16;      // palette 1
constexpr int kTileMaxColsb = 64;     // bytes per tile row
constexpr int kTilePalette = 1;

// The 64-byte memory operand of ldtilecfg (palette 1). A plain aggregate
// (no member initialisers, hence no implicit constructor symbol): start from
// TileConfig{} and set palette_id = kTilePalette.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of tile i (0 = unused)
  uint8_t rows[16];    // rows of tile i
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads exactly 64 bytes");

#ifdef KT_AMX_EMULATE
// The emulated tile unit (one per thread), in tile_emu.cpp.
enum class EmuDot : int { kBusd, kBsud, kBssd, kBf16ps };
void emu_tile_config(const TileConfig& cfg);
void emu_tile_release();
void emu_tile_load(int t, const void* base, size_t stride);
void emu_tile_store(int t, void* base, size_t stride);
void emu_tile_zero(int t);
void emu_tile_dot(EmuDot op, int c, int a, int b);
#endif

namespace {

template <int T>
struct TileIndex {
  static_assert(T >= 0 && T < kNumTiles, "palette 1 has tiles tmm0..tmm7");
  static constexpr int value = T;
};

template <int C, int A, int B>
struct DotOperands {
  static_assert(C != A && C != B && A != B, "tile dot products need three distinct tiles");
  static constexpr int c = TileIndex<C>::value, a = TileIndex<A>::value, b = TileIndex<B>::value;
};

#ifdef KT_AMX_EMULATE

static inline void tile_config(const TileConfig& cfg) { emu_tile_config(cfg); }
static inline void tile_release() { emu_tile_release(); }
template <int T>
static inline void tile_load(const void* p, size_t stride) { emu_tile_load(TileIndex<T>::value, p, stride); }
template <int T>
static inline void tile_store(void* p, size_t stride) { emu_tile_store(TileIndex<T>::value, p, stride); }
template <int T>
static inline void tile_zero() { emu_tile_zero(TileIndex<T>::value); }
template <int C, int A, int B>
static inline void tile_dpbusd() {
  using O = DotOperands<C, A, B>;
  emu_tile_dot(EmuDot::kBusd, O::c, O::a, O::b);
}
template <int C, int A, int B>
static inline void tile_dpbsud() {
  using O = DotOperands<C, A, B>;
  emu_tile_dot(EmuDot::kBsud, O::c, O::a, O::b);
}
template <int C, int A, int B>
static inline void tile_dpbssd() {
  using O = DotOperands<C, A, B>;
  emu_tile_dot(EmuDot::kBssd, O::c, O::a, O::b);
}
template <int C, int A, int B>
static inline void tile_dpbf16ps() {
  using O = DotOperands<C, A, B>;
  emu_tile_dot(EmuDot::kBf16ps, O::c, O::a, O::b);
}

#else  // the real tile unit

// GCC's AMX intrinsics are macros that paste the tile number into the
// assembly text (so it must be a literal, not a template argument) and whose
// tileloadd / ldtilecfg tell the compiler they read no memory (or only 8 of
// the config's 64 bytes), which lets it sink or drop the stores that fill an
// operand. These wrappers print the tile number from an "n" operand and
// declare the memory they touch ("memory" clobbers).
static inline void tile_config(const TileConfig& cfg) { __asm__ volatile("ldtilecfg\t%0" ::"m"(cfg) : "memory"); }
static inline void tile_release() { __asm__ volatile("tilerelease" ::: "memory"); }
template <int T>
static inline void tile_load(const void* p, size_t stride) {
  __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm%c2|tileloadd\t%%tmm%c2, [%0+%1*1]}" ::"r"(p), "r"(stride),
                   "n"(TileIndex<T>::value)
                   : "memory");
}
template <int T>
static inline void tile_store(void* p, size_t stride) {
  __asm__ volatile("{tilestored\t%%tmm%c2, (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm%c2}" ::"r"(p), "r"(stride),
                   "n"(TileIndex<T>::value)
                   : "memory");
}
template <int T>
static inline void tile_zero() {
  __asm__ volatile("tilezero\t%%tmm%c0" ::"n"(TileIndex<T>::value));
}
#define KT_AMX_TILE_DOT(name)                                                                              \
  __asm__ volatile("{" #name "\t%%tmm%c2, %%tmm%c1, %%tmm%c0|" #name "\t%%tmm%c0, %%tmm%c1, %%tmm%c2}" ::"n"(O::c), \
                   "n"(O::a), "n"(O::b))
template <int C, int A, int B>
static inline void tile_dpbusd() {
  using O = DotOperands<C, A, B>;
  KT_AMX_TILE_DOT(tdpbusd);
}
template <int C, int A, int B>
static inline void tile_dpbsud() {
  using O = DotOperands<C, A, B>;
  KT_AMX_TILE_DOT(tdpbsud);
}
template <int C, int A, int B>
static inline void tile_dpbssd() {
  using O = DotOperands<C, A, B>;
  KT_AMX_TILE_DOT(tdpbssd);
}
template <int C, int A, int B>
static inline void tile_dpbf16ps() {
  using O = DotOperands<C, A, B>;
  KT_AMX_TILE_DOT(tdpbf16ps);
}
#undef KT_AMX_TILE_DOT

#endif

}  // namespace
}  // namespace KT_AMX_NS
}  // namespace kt
