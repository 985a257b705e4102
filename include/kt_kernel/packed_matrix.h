// The packed weight layout: one layout for every backend and every file.
//
// A weight matrix W [rows N][cols K] (N outputs, K the reduction) is cut into
// blocks of kRowBlock = 16 output rows. Inside a block, K runs in "steps";
// one step of one block is exactly 64 bytes, i.e. one cache line and one
// AVX-512 register:
//
//   INT8  step = 4 k:  byte 4*r + t      = q8[row r][k0 + t]            (s8)
//   INT4  step = 8 k:  byte 4*r + t      = q4[r][k0 + t] | q4[r][k0 + 4 + t] << 4
//   BF16  step = 2 k:  half 2*r + t      = bf16(W[r][k0 + t])
//
// This is the operand order of vpdpbusd / vdpbf16ps with a broadcast
// activation (one 32-bit lane per output row), and it is also the "B" tile of
// AMX (tdpbusd: 16 rows of 4-byte k-quads; tdpbf16ps: 16 rows of bf16 pairs),
// so AVX-512 and AMX read the same bytes: one copy of the weights in memory.
//
// Scales live beside the quantised data, 16 floats (one per row of the block)
// per group, so a single aligned load fetches them:
//   INT8: value = scale[r] * q8;          compensation[r] = 128 * sum_k q8
//         (activations are fed as u8 = q + 128; the compensation undoes it)
//   INT8 grouped (scheme 4, e.g. GGUF Q8_0 loaded losslessly): the INT8 weight
//         bytes above; value = scale[r][g] * q8 with scales [blocks][groups][16]
//         as INT4, and compensation per row AND group, [blocks][groups][16]:
//         comp[r][g] = 128 * sum of q8 over group g (int32). Per group g:
//           dot_g = sum over the group of u8act * s8w (int32)
//           acc   = fmaf(float(dot_g - comp[r][g]), scale[r][g], acc)  (group order)
//         and v = acc * a_scale. Group sizes 32, 64 or 128.
//   FP8 block (scheme 5, kFP8Block, e.g. DeepSeek/Kimi FP8 checkpoints loaded
//         losslessly): e4m3 codes (1 byte) in the INT8 byte order above (4 k per
//         step: byte 4*r + t = code[row r][k0 + t]); scales [blocks][groups][16]
//         fp32 as INT4 (a 128x128 weight_scale_inv expanded per row:
//         scale[r][g] = weight_scale_inv[r / 128][g]); no compensation.
//         value = scale[r][g] * e4m3(code); e4m3 = sign, 4-bit exponent (bias
//         7), 3-bit mantissa, subnormals, no infinities; codes 0x7f / 0xff are
//         NaN (never produced by the packers; kernels may read them as +-480).
//         Activations are BF16 (the BF16 encoding and prepare_acts). Scalar
//         twin, per group g in order: acc_g = sum over the group (in double) of
//         e4m3(code) * bf16(act), then out = float(sum_g double(scale[r][g]) * acc_g)
//         (double, group order). Optimised kernels match it to fp32
//         accumulation error (floating format: a tolerance, not bit-exact).
//         Group sizes 32, 64 or 128 (checkpoints: 128); K a multiple of it.
//   INT4: value = scale[r][g] * q4 + bias[r][g],  q4 in 0..15
//         symmetric: bias = -8 * scale (not stored); asymmetric: bias = min.
//   BF16: no scales.
//
// K is padded with zero weights to a multiple of kColPad (64: one AMX int8
// tile row), N to a multiple of 16 with zero rows. Group sizes divide K.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kt {

// Bumped whenever the byte layout above changes; stored in converted files
// and exported to Python as kt_kernel.PACKED_LAYOUT_VERSION.
constexpr uint32_t kPackedLayoutVersion = 1;

constexpr uint32_t kRowBlock = 16;    // output rows per block: 16 fp32/int32 lanes of a zmm
constexpr uint32_t kColPad = 64;      // K padding: 64 int8 = one AMX tile row, 32 bf16 pairs
constexpr uint32_t kStepBytes = 64;   // bytes of one k-step of one row block
constexpr uint32_t kActSumGroup = 32; // activation sums are kept per 32 k (smallest group)

// One k-step of one row block, per format: the unit every kernel loads.
struct Int8Step {
  int8_t q[kRowBlock][4];  // [row][k0 + t]
};
struct Int4Step {
  uint8_t q[kRowBlock][4];  // [row][t]: low nibble k0 + t, high nibble k0 + 4 + t
};
struct Bf16Step {
  uint16_t w[kRowBlock][2];  // [row][k0 + t]
};
static_assert(sizeof(Int8Step) == kStepBytes, "an INT8 step is one 64-byte line");
static_assert(sizeof(Int4Step) == kStepBytes, "an INT4 step is one 64-byte line");
static_assert(sizeof(Bf16Step) == kStepBytes, "a BF16 step is one 64-byte line");

// Codes are stored in files and exported to Python; never renumber.
enum class QuantScheme : uint32_t {
  kBF16 = 0,
  kInt8PerChannel = 1,  // symmetric, one scale per output row
  kInt4Sym = 2,         // symmetric, one scale per row and group of K
  kInt4Asym = 3,        // scale and min per row and group of K
  kInt8Group = 4,       // symmetric INT8, one scale per row and group of K (32/64/128)
  kFP8Block = 5,        // e4m3 codes, one fp32 scale per row and group of K (128), BF16 activations
};
constexpr int kNumSchemes = 6;

static inline bool scheme_is_int4(QuantScheme s) {
  return s == QuantScheme::kInt4Sym || s == QuantScheme::kInt4Asym;
}

// INT8 weights (s8 codes, 4 k per step, u8 activations, compensation).
static inline bool scheme_is_int8(QuantScheme s) {
  return s == QuantScheme::kInt8PerChannel || s == QuantScheme::kInt8Group;
}

// Schemes whose scales are per row and group of K.
static inline bool scheme_has_groups(QuantScheme s) {
  return scheme_is_int4(s) || s == QuantScheme::kInt8Group || s == QuantScheme::kFP8Block;
}

// Schemes whose activations are BF16 (2 bytes per k).
static inline bool scheme_bf16_acts(QuantScheme s) { return s == QuantScheme::kBF16 || s == QuantScheme::kFP8Block; }

static inline uint32_t scheme_k_per_step(QuantScheme s) {
  return s == QuantScheme::kBF16 ? 2u : ((scheme_is_int8(s) || s == QuantScheme::kFP8Block) ? 4u : 8u);
}

// The value of an e4m3 (fn) code: exact in float; 0x7f / 0xff are NaN.
static inline float fp8_e4m3_to_float(uint8_t c) {
  const int e = (c >> 3) & 0xf, m = c & 7;
  float v;
  if (e == 0xf && m == 7) {
    v = __builtin_nanf("");
  } else if (e == 0) {
    v = float(m) * (1.0f / 512.0f);  // m / 8 * 2^-6
  } else {
    v = (1.0f + float(m) * 0.125f);
    for (int i = e; i < 7; ++i) v *= 0.5f;
    for (int i = 7; i < e; ++i) v *= 2.0f;
  }
  return (c & 0x80) ? -v : v;
}

static inline size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

// Where every section of one packed matrix lives, relative to its base
// pointer. Sections start on 64-byte boundaries.
struct PackedGeometry {
  uint32_t rows = 0, cols = 0;             // logical N, K
  uint32_t rows_padded = 0, cols_padded = 0;
  uint32_t group_size = 0;                 // K per scale group (cols_padded for per channel; 0 for BF16)
  uint32_t groups = 0;                     // cols_padded / group_size
  uint32_t per_channel = 0;                // 1: one scale per row (INT8, INT4 with group_size 0)
  size_t block_weight_bytes = 0;           // weight bytes of one row block
  size_t weights_offset = 0, scales_offset = 0, mins_offset = 0, compensation_offset = 0;
  size_t total_bytes = 0;
};

// group_size 0 means one group per row (per channel; not for kInt8Group or
// kFP8Block, which need 32, 64 or 128). Returns false (and leaves *g untouched) when
// the combination is invalid: group not a multiple of 32 or not dividing
// cols, zero-sized matrix, or one whose padded sizes do not fit 32 bits.
static inline bool packed_geometry(QuantScheme s, uint32_t rows, uint32_t cols, uint32_t group_size,
                                   PackedGeometry* g) {
  if (rows == 0 || cols == 0) return false;
  if (round_up(rows, kRowBlock) > UINT32_MAX || round_up(cols, kColPad) > UINT32_MAX) return false;
  PackedGeometry r;
  r.rows = rows;
  r.cols = cols;
  r.rows_padded = uint32_t(round_up(rows, kRowBlock));
  r.cols_padded = uint32_t(round_up(cols, kColPad));
  const size_t blocks = r.rows_padded / kRowBlock;
  const size_t steps = r.cols_padded / scheme_k_per_step(s);
  r.block_weight_bytes = steps * kStepBytes;
  r.weights_offset = 0;
  size_t off = round_up(blocks * r.block_weight_bytes, 64);
  if (s == QuantScheme::kBF16) {
    if (group_size != 0) return false;
  } else if (s == QuantScheme::kInt8PerChannel) {
    if (group_size != 0) return false;
    r.group_size = r.cols_padded;
    r.groups = 1;
    r.per_channel = 1;
  } else if (s == QuantScheme::kInt8Group || s == QuantScheme::kFP8Block) {
    if (group_size != 32 && group_size != 64 && group_size != 128) return false;
    if (cols % group_size != 0 || r.cols_padded % group_size != 0) return false;
    r.group_size = group_size;
    r.groups = r.cols_padded / group_size;
  } else {
    if (group_size == 0) {
      r.group_size = r.cols_padded;
      r.per_channel = 1;
    } else {
      if (group_size % kActSumGroup != 0 || cols % group_size != 0) return false;
      // cols_padded - cols is 0 or 32 for these sizes, so padding forms whole groups.
      if (r.cols_padded % group_size != 0) return false;
      r.group_size = group_size;
    }
    r.groups = r.cols_padded / r.group_size;
  }
  if (s != QuantScheme::kBF16) {
    r.scales_offset = off;
    off = round_up(off + blocks * r.groups * kRowBlock * sizeof(float), 64);
  }
  if (s == QuantScheme::kInt4Asym) {
    r.mins_offset = off;
    off = round_up(off + blocks * r.groups * kRowBlock * sizeof(float), 64);
  }
  if (scheme_is_int8(s)) {  // per channel: groups = 1
    r.compensation_offset = off;
    off = round_up(off + blocks * r.groups * kRowBlock * sizeof(int32_t), 64);
  }
  r.total_bytes = off;
  *g = r;
  return true;
}

// A non-owning view of one packed matrix, the argument of every kernel.
struct PackedMatrixView {
  QuantScheme scheme = QuantScheme::kBF16;
  PackedGeometry geo;
  const uint8_t* weights = nullptr;       // [rows_padded/16][block_weight_bytes]
  const float* scales = nullptr;          // INT4, INT8 grouped, FP8: [blocks][groups][16]; INT8: [blocks][16]
  const float* mins = nullptr;            // INT4 asym: [blocks][groups][16]
  const int32_t* compensation = nullptr;  // INT8: [blocks][16]; INT8 grouped: [blocks][groups][16]
  // A hint, never read as data: the weights of the matrix (same geometry)
  // that the caller multiplies next over the same row blocks, e.g. the next
  // expert's down projection. A kernel may prefetch its first blocks while
  // it finishes this one, so the next call does not start cold.
  const uint8_t* next_weights = nullptr;
};

static inline PackedMatrixView make_packed_view(QuantScheme s, const PackedGeometry& g, const void* base) {
  PackedMatrixView v;
  const uint8_t* b = static_cast<const uint8_t*>(base);
  v.scheme = s;
  v.geo = g;
  v.weights = b + g.weights_offset;
  if (s != QuantScheme::kBF16) v.scales = reinterpret_cast<const float*>(b + g.scales_offset);
  if (s == QuantScheme::kInt4Asym) v.mins = reinterpret_cast<const float*>(b + g.mins_offset);
  if (scheme_is_int8(s)) v.compensation = reinterpret_cast<const int32_t*>(b + g.compensation_offset);
  return v;
}

}  // namespace kt
