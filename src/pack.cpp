// Quantisation and packing of weights into the layout of packed_matrix.h,
// and the exact inverse. Runs at load time, at baseline flags.
//
// A weight row (per channel) or group holding Inf or NaN gets a NaN scale
// (INT4: and min), and an FP8 group holding a NaN code a NaN scale, so the
// outputs computed from it are NaN in every backend rather than finite
// numbers that depend on how the amax and the codes treat non-finite values
// (docs/DESIGN_NOTES.md, "Non-finite values").
#include "kt_kernel/pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "reference/kernels_reference.h"

namespace kt {
namespace {

// Element i of a dense source that may be unaligned: tensors in a
// safetensors or GGUF file sit at whatever offset the file gives them, and
// an access through a misaligned typed pointer is undefined behaviour (UBSan
// flags it); memcpy compiles to a plain load.
template <typename T>
T load_unaligned(const void* src, size_t i) {
  T v;
  std::memcpy(&v, static_cast<const uint8_t*>(src) + i * sizeof(T), sizeof(T));
  return v;
}

float load_elem(const void* src, DType dt, size_t i) {
  switch (dt) {
    case DType::kF32: return load_unaligned<float>(src, i);
    case DType::kF16: return f16_to_f32(load_unaligned<uint16_t>(src, i));
    case DType::kBF16: return bf16_to_f32(load_unaligned<uint16_t>(src, i));
    case DType::kF64: return float(load_unaligned<double>(src, i));
  }
  return 0.0f;
}

// Byte offset of (row r within block, k) inside one block, and the nibble.
size_t int8_offset(size_t r, size_t k) { return (k / 4) * kStepBytes + 4 * r + (k % 4); }
size_t int4_offset(size_t r, size_t k) { return (k / 8) * kStepBytes + 4 * r + (k % 8 & 3); }
int int4_shift(size_t k) { return (k % 8) < 4 ? 0 : 4; }
size_t bf16_index(size_t r, size_t k) { return (k / 2) * 32 + 2 * r + (k % 2); }

// `rows` holds the block's rows, `row_len` floats each; the matrix being
// packed is columns [col0, col0 + g.cols) of them. Per-channel statistics
// are taken over the whole row, so a slice of K packs exactly as the same
// columns of the unsliced matrix would.
void pack_block_bf16(const PackedGeometry& g, const float* rows, size_t row_len, size_t col0, size_t valid_rows,
                     uint8_t* blk) {
  uint16_t* w = reinterpret_cast<uint16_t*>(blk);
  for (size_t r = 0; r < kRowBlock; ++r)
    for (size_t k = 0; k < g.cols_padded; ++k)
      w[bf16_index(r, k)] = (r < valid_rows && k < g.cols) ? f32_to_bf16(rows[r * row_len + col0 + k]) : 0;
}

void pack_block_int8(const PackedGeometry& g, const float* rows, size_t row_len, size_t col0, size_t valid_rows,
                     uint8_t* blk, float* scales, int32_t* comp) {
  std::vector<int8_t> q(row_len);
  for (size_t r = 0; r < kRowBlock; ++r) {
    int32_t sum = 0;
    float scale = 0.0f;
    if (r < valid_rows) {
      scale = ref::quantize_row_i8(rows + r * row_len, row_len, q.data());
      for (size_t k = 0; k < g.cols; ++k) sum += q[col0 + k];
    }
    for (size_t k = 0; k < g.cols_padded; ++k)
      blk[int8_offset(r, k)] = uint8_t((r < valid_rows && k < g.cols) ? q[col0 + k] : 0);
    scales[r] = scale;
    comp[r] = 128 * sum;
  }
}

// INT8 grouped: per row and group of the packed columns, the INT8 rule
// (quantize_row_i8) over the group; padding groups get scale 0, comp 0.
void pack_block_int8_group(const PackedGeometry& g, const float* rows, size_t row_len, size_t col0,
                           size_t valid_rows, uint8_t* blk, float* scales, int32_t* comp) {
  std::vector<int8_t> q(g.group_size);
  std::memset(blk, 0, g.block_weight_bytes);
  for (size_t r = 0; r < kRowBlock; ++r) {
    for (size_t grp = 0; grp < g.groups; ++grp) {
      const size_t k0 = grp * g.group_size;
      const size_t k1 = std::min<size_t>(k0 + g.group_size, g.cols);
      int32_t sum = 0;
      float scale = 0.0f;
      if (r < valid_rows && k0 < k1) {
        scale = ref::quantize_row_i8(rows + r * row_len + col0 + k0, k1 - k0, q.data());
        for (size_t k = k0; k < k1; ++k) {
          blk[int8_offset(r, k)] = uint8_t(q[k - k0]);
          sum += q[k - k0];
        }
      }
      scales[grp * kRowBlock + r] = scale;
      comp[grp * kRowBlock + r] = 128 * sum;
    }
  }
}

// The e4m3 code nearest to x (round to nearest even), saturating at +-448
// (code 0x7e); NaN codes are never produced. Exact arithmetic in double.
uint8_t fp8_e4m3_from_double(double x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(x);
  if (!(a < 448.0)) return uint8_t(sign | 0x7e);  // also NaN -> max (the group's scale is NaN then)
  int code;
  if (a < 0.015625) {  // below 2^-6: subnormal step 2^-9 (m = 8 rounds up to the smallest normal, code 8)
    code = int(std::nearbyint(a * 512.0));
  } else {
    int E;
    const double f = std::frexp(a, &E);  // a = f * 2^E, f in [0.5, 1): unbiased exponent E - 1 in [-6, 8]
    const int m = int(std::nearbyint((f * 2.0 - 1.0) * 8.0));  // 0..8; 8 carries into the exponent
    code = ((E - 1 + 7) << 3) + m;
  }
  if (code > 0x7e) code = 0x7e;
  return uint8_t(sign | code);
}

// The FP8 group rule: scale = amax / 448 (0 for an all-zero group, NaN for a
// group holding Inf or NaN); writes the codes to q when given.
float fp8_group_codes(const float* w, size_t n, uint8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (size_t i = 0; i < n; ++i) {
    amax = std::fmax(amax, std::fabs(w[i]));
    finite = finite && std::isfinite(w[i]);
  }
  const float scale = finite ? amax / 448.0f : std::numeric_limits<float>::quiet_NaN();
  if (q)
    for (size_t i = 0; i < n; ++i) q[i] = scale != 0.0f ? fp8_e4m3_from_double(double(w[i]) / double(scale)) : 0;
  return scale;
}

// FP8 block: per row and group of the packed columns, scale = amax / 448 and
// code = e4m3(RNE(w / scale)) (w / scale in double); padding groups scale 0.
void pack_block_fp8(const PackedGeometry& g, const float* rows, size_t row_len, size_t col0, size_t valid_rows,
                    uint8_t* blk, float* scales) {
  std::memset(blk, 0, g.block_weight_bytes);
  for (size_t r = 0; r < kRowBlock; ++r) {
    for (size_t grp = 0; grp < g.groups; ++grp) {
      const size_t k0 = grp * g.group_size;
      const size_t k1 = std::min<size_t>(k0 + g.group_size, g.cols);
      float scale = 0.0f;
      if (r < valid_rows && k0 < k1) {
        const float* w = rows + r * row_len + col0;
        scale = fp8_group_codes(w + k0, k1 - k0, nullptr);
        for (size_t k = k0; k < k1; ++k)
          blk[int8_offset(r, k)] = scale != 0.0f ? fp8_e4m3_from_double(double(w[k]) / double(scale)) : 0;
      }
      scales[grp * kRowBlock + r] = scale;
    }
  }
}

// The amax rules on the statistics range w[s0, s1): Q4_0 (symmetric,
// d = m / -8 with m the element of largest magnitude) and Q4_1 (asymmetric,
// d = (max - min) / 15, lo = min); both NaN when the range holds Inf or NaN
// (the codes then all come out 15, and the kernels' results NaN).
void int4_amax_params(bool sym, const float* w, ptrdiff_t s0, ptrdiff_t s1, float* d, float* lo) {
  for (ptrdiff_t k = s0; k < s1; ++k)
    if (!std::isfinite(w[k])) {
      *d = *lo = std::numeric_limits<float>::quiet_NaN();
      return;
    }
  if (sym) {
    float m = 0.0f;
    for (ptrdiff_t k = s0; k < s1; ++k)
      if (std::fabs(w[k]) > std::fabs(m)) m = w[k];
    *d = m / -8.0f;
    *lo = 0.0f;
  } else {
    float hi = w[s0], l = w[s0];
    for (ptrdiff_t k = s0; k < s1; ++k) {
      l = std::fmin(l, w[k]);
      hi = std::fmax(hi, w[k]);
    }
    *d = (hi - l) / 15.0f;
    *lo = l;
  }
}

// The code of w for scale d (id = 1 / d, or 0 when d is 0) and min lo.
int int4_code(bool sym, float w, float id, float lo) {
  if (sym) return int(std::fmax(0.0f, std::fmin(15.0f, std::nearbyint(w * id) + 8.0f)));
  return int(std::fmax(0.0f, std::fmin(15.0f, std::nearbyint((w - lo) * id))));
}

float inverse_or_zero(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

// Squared error of w[0, n) quantised with (d, lo), values as the kernels
// evaluate them (scale * q + bias). Used only to rank candidates; the codes
// stored come from int4_code.
double int4_sq_error(bool sym, const float* w, size_t n, float d, float lo) {
  const float id = inverse_or_zero(d);
  const float off = sym ? 8.0f : 0.0f, sub = sym ? 0.0f : lo, bias = sym ? -8.0f * d : lo;
  // (x + 1.5 * 2^23) - 1.5 * 2^23 rounds to nearest even for |x| < 2^22
  // (here |x| <= ~20) without a libm call; -ffp-contract=off and no
  // fast-math keep the add/sub pair.
  const float magic = 12582912.0f;
  float e = 0.0f;
  for (size_t k = 0; k < n; ++k) {
    const float x = (w[k] - sub) * id;
    const float q = std::fmax(0.0f, std::fmin(15.0f, ((x + magic) - magic) + off));
    const float r = w[k] - (d * q + bias);
    e += r * r;
  }
  return double(e);
}

// Least-squares refit of (d, lo) for the codes that (d, lo) gives w[0, n).
// Returns false when the system is degenerate.
bool int4_refit(bool sym, const float* w, size_t n, float d, float lo, float* d_out, float* lo_out) {
  const float id = inverse_or_zero(d);
  double sqq = 0, swq = 0, sq = 0, sw = 0;
  for (size_t k = 0; k < n; ++k) {
    const double q = int4_code(sym, w[k], id, lo) - (sym ? 8.0 : 0.0);
    sqq += q * q;
    swq += double(w[k]) * q;
    sq += q;
    sw += w[k];
  }
  if (sym) {
    if (sqq <= 0) return false;
    *d_out = float(swq / sqq);
    *lo_out = 0.0f;
    return true;
  }
  const double det = double(n) * sqq - sq * sq;
  if (det <= 0) return false;
  *d_out = float((double(n) * swq - sq * sw) / det);
  *lo_out = float((sqq * sw - sq * swq) / det);
  return true;
}

// Scale (and min) of one group w[0, n) minimising the squared rounding
// error over a grid around the amax rule (which is one candidate), then a
// least-squares refit of the winner's codes.
void int4_search_params(bool sym, const float* w, size_t n, float* d, float* lo) {
  int4_amax_params(sym, w, 0, ptrdiff_t(n), d, lo);
  if (std::isnan(*d)) return;  // a non-finite group keeps its NaN parameters
  double best = int4_sq_error(sym, w, n, *d, *lo);
  if (best == 0.0) return;
  auto consider = [&](float cd, float clo) {
    if (!std::isfinite(cd) || !std::isfinite(clo)) return;
    const double e = int4_sq_error(sym, w, n, cd, clo);
    if (e < best) {
      best = e;
      *d = cd;
      *lo = clo;
    }
  };
  if (sym) {
    const float d0 = *d;
    const float m = d0 * -8.0f;  // the element of largest magnitude
    // The extreme element mapped to code 0 with a smaller or larger step
    // (clipping a little), or to code 15 (the other sign's end).
    for (int i = 0; i <= 12; ++i) consider(m / -(6.5f + 0.25f * float(i)), 0.0f);
    for (int i = 0; i <= 4; ++i) consider(m / (6.0f + 0.25f * float(i)), 0.0f);
  } else {
    const float lo0 = *lo, hi0 = *lo + 15.0f * *d;
    const float range = hi0 - lo0;
    for (int a = 0; a <= 4; ++a)
      for (int b = 0; b <= 4; ++b) {
        const float l = lo0 + range * 0.03f * float(a), h = hi0 - range * 0.03f * float(b);
        if (h > l) consider((h - l) / 15.0f, l);
      }
  }
  float rd, rlo;
  if (int4_refit(sym, w, n, *d, *lo, &rd, &rlo)) consider(rd, rlo);
}

void pack_block_int4(QuantScheme s, const PackedGeometry& g, const float* rows, size_t row_len, size_t col0,
                     size_t valid_rows, uint8_t* blk, float* scales, float* mins) {
  const bool per_channel = g.per_channel != 0;
  const bool sym = s == QuantScheme::kInt4Sym;
  const uint8_t pad_q = sym ? 8 : 0;  // encodes 0 (symmetric); unused columns (asymmetric)
  std::memset(blk, uint8_t(pad_q | pad_q << 4), g.block_weight_bytes);
  for (size_t r = 0; r < kRowBlock; ++r) {
    for (size_t grp = 0; grp < g.groups; ++grp) {
      const size_t k0 = grp * g.group_size;
      const size_t k1 = std::min<size_t>(k0 + g.group_size, g.cols);
      // Statistics range, relative to the packed columns: the group, or the whole row.
      const ptrdiff_t s0 = per_channel ? -ptrdiff_t(col0) : ptrdiff_t(k0);
      const ptrdiff_t s1 = per_channel ? ptrdiff_t(row_len - col0) : ptrdiff_t(k1);
      float d = 0.0f, lo = 0.0f;
      if (r < valid_rows && k0 < k1) {
        const float* w = rows + r * row_len + col0;
        int4_amax_params(sym, w, s0, s1, &d, &lo);
        const float id = inverse_or_zero(d);
        for (size_t k = k0; k < k1; ++k) {
          const int q = int4_code(sym, w[k], id, lo);
          blk[int4_offset(r, k)] = uint8_t((blk[int4_offset(r, k)] & ~(0xf << int4_shift(k))) | q << int4_shift(k));
        }
      }
      scales[grp * kRowBlock + r] = d;
      if (mins) mins[grp * kRowBlock + r] = sym ? 0.0f : lo;
    }
  }
}

}  // namespace

void pack_matrix_blocks(QuantScheme s, const PackedGeometry& g, const void* src, DType dt, size_t ld, void* dst,
                        size_t block_begin, size_t block_end, size_t col0, size_t full_cols) {
  uint8_t* base = static_cast<uint8_t*>(dst);
  const size_t row_len = full_cols ? full_cols : g.cols;
  std::vector<float> rows(size_t(kRowBlock) * row_len);
  for (size_t b = block_begin; b < block_end; ++b) {
    const size_t r0 = b * kRowBlock;
    const size_t valid = r0 < g.rows ? std::min<size_t>(kRowBlock, g.rows - r0) : 0;
    for (size_t r = 0; r < valid; ++r)
      for (size_t k = 0; k < row_len; ++k) rows[r * row_len + k] = load_elem(src, dt, (r0 + r) * ld + k);
    uint8_t* blk = base + g.weights_offset + b * g.block_weight_bytes;
    switch (s) {
      case QuantScheme::kBF16: pack_block_bf16(g, rows.data(), row_len, col0, valid, blk); break;
      case QuantScheme::kInt8PerChannel:
        pack_block_int8(g, rows.data(), row_len, col0, valid, blk, reinterpret_cast<float*>(base + g.scales_offset) + b * kRowBlock,
                        reinterpret_cast<int32_t*>(base + g.compensation_offset) + b * kRowBlock);
        break;
      case QuantScheme::kInt8Group: {
        const size_t per_block = size_t(g.groups) * kRowBlock;
        pack_block_int8_group(g, rows.data(), row_len, col0, valid, blk,
                              reinterpret_cast<float*>(base + g.scales_offset) + b * per_block,
                              reinterpret_cast<int32_t*>(base + g.compensation_offset) + b * per_block);
        break;
      }
      case QuantScheme::kFP8Block:
        pack_block_fp8(g, rows.data(), row_len, col0, valid, blk,
                       reinterpret_cast<float*>(base + g.scales_offset) + b * size_t(g.groups) * kRowBlock);
        break;
      case QuantScheme::kInt4Sym:
      case QuantScheme::kInt4Asym: {
        const size_t per_block = size_t(g.groups) * kRowBlock;
        float* mins = s == QuantScheme::kInt4Asym ? reinterpret_cast<float*>(base + g.mins_offset) + b * per_block
                                                  : nullptr;
        pack_block_int4(s, g, rows.data(), row_len, col0, valid, blk, reinterpret_cast<float*>(base + g.scales_offset) + b * per_block,
                        mins);
        break;
      }
    }
  }
}

void pack_quantized_blocks(QuantScheme s, const PackedGeometry& g, const void* q, size_t ld_q, const float* scales,
                           const float* mins, size_t scales_ld, void* dst, size_t block_begin, size_t block_end,
                           size_t col0) {
  const bool int4 = scheme_is_int4(s);
  if ((int4 && col0 % 2) || (scheme_has_groups(s) && !g.per_channel && col0 % g.group_size))
    throw std::invalid_argument("pack_quantized_blocks: column offset " + std::to_string(col0) +
                                " is not on a group boundary");
  uint8_t* base = static_cast<uint8_t*>(dst);
  for (size_t b = block_begin; b < block_end; ++b) {
    const size_t r0 = b * kRowBlock;
    const size_t valid = r0 < g.rows ? std::min<size_t>(kRowBlock, g.rows - r0) : 0;
    uint8_t* blk = base + g.weights_offset + b * g.block_weight_bytes;
    switch (s) {
      case QuantScheme::kBF16: {
        uint16_t* w = reinterpret_cast<uint16_t*>(blk);
        const uint16_t* src = static_cast<const uint16_t*>(q);
        for (size_t r = 0; r < kRowBlock; ++r)
          for (size_t k = 0; k < g.cols_padded; ++k)
            w[bf16_index(r, k)] = (r < valid && k < g.cols) ? src[(r0 + r) * ld_q + col0 + k] : 0;
        break;
      }
      case QuantScheme::kInt8PerChannel: {
        const int8_t* src = static_cast<const int8_t*>(q);
        float* sc = reinterpret_cast<float*>(base + g.scales_offset) + b * kRowBlock;
        int32_t* comp = reinterpret_cast<int32_t*>(base + g.compensation_offset) + b * kRowBlock;
        for (size_t r = 0; r < kRowBlock; ++r) {
          int32_t sum = 0;
          for (size_t k = 0; k < g.cols_padded; ++k) {
            const int8_t v = (r < valid && k < g.cols) ? src[(r0 + r) * ld_q + col0 + k] : int8_t(0);
            blk[int8_offset(r, k)] = uint8_t(v);
            sum += v;
          }
          sc[r] = r < valid ? scales[(r0 + r) * scales_ld] : 0.0f;
          comp[r] = 128 * sum;
        }
        break;
      }
      case QuantScheme::kInt8Group: {
        const int8_t* src = static_cast<const int8_t*>(q);
        const size_t per_block = size_t(g.groups) * kRowBlock;
        float* sc = reinterpret_cast<float*>(base + g.scales_offset) + b * per_block;
        int32_t* comp = reinterpret_cast<int32_t*>(base + g.compensation_offset) + b * per_block;
        const size_t g0 = col0 / g.group_size;
        const size_t real_groups = (g.cols + g.group_size - 1) / g.group_size;
        for (size_t r = 0; r < kRowBlock; ++r) {
          for (size_t grp = 0; grp < g.groups; ++grp) {
            int32_t sum = 0;
            for (size_t k = grp * g.group_size; k < (grp + 1) * g.group_size; ++k) {
              const int8_t v = (r < valid && k < g.cols) ? src[(r0 + r) * ld_q + col0 + k] : int8_t(0);
              blk[int8_offset(r, k)] = uint8_t(v);
              sum += v;
            }
            const bool real = r < valid && grp < real_groups;
            sc[grp * kRowBlock + r] = real ? scales[(r0 + r) * scales_ld + g0 + grp] : 0.0f;
            comp[grp * kRowBlock + r] = 128 * sum;
          }
        }
        break;
      }
      case QuantScheme::kFP8Block: {
        const uint8_t* src = static_cast<const uint8_t*>(q);
        float* sc = reinterpret_cast<float*>(base + g.scales_offset) + b * size_t(g.groups) * kRowBlock;
        const size_t g0 = col0 / g.group_size;
        const size_t real_groups = (g.cols + g.group_size - 1) / g.group_size;
        for (size_t r = 0; r < kRowBlock; ++r) {
          for (size_t k = 0; k < g.cols_padded; ++k)
            blk[int8_offset(r, k)] = (r < valid && k < g.cols) ? src[(r0 + r) * ld_q + col0 + k] : uint8_t(0);
          for (size_t grp = 0; grp < g.groups; ++grp) {
            const bool real = r < valid && grp < real_groups;
            // A NaN code (0x7f, 0xff) NaNs its group's scale: the kernels
            // decode such codes differently (the AVX-512 one as +-480).
            bool nan_code = false;
            for (size_t k = grp * g.group_size; real && k < std::min<size_t>((grp + 1) * g.group_size, g.cols); ++k)
              nan_code = nan_code || (blk[int8_offset(r, k)] & 0x7f) == 0x7f;
            sc[grp * kRowBlock + r] = !real ? 0.0f
                                      : nan_code ? std::numeric_limits<float>::quiet_NaN()
                                                 : scales[(r0 + r) * scales_ld + g0 + grp];
          }
        }
        break;
      }
      case QuantScheme::kInt4Sym:
      case QuantScheme::kInt4Asym: {
        const bool sym = s == QuantScheme::kInt4Sym;
        const uint8_t pad_q = sym ? 8 : 0;
        std::memset(blk, uint8_t(pad_q | pad_q << 4), g.block_weight_bytes);
        const uint8_t* src = static_cast<const uint8_t*>(q);
        const size_t per_block = size_t(g.groups) * kRowBlock;
        float* sc = reinterpret_cast<float*>(base + g.scales_offset) + b * per_block;
        float* mn = sym ? nullptr : reinterpret_cast<float*>(base + g.mins_offset) + b * per_block;
        const size_t g0 = g.per_channel ? 0 : col0 / g.group_size;
        const size_t real_groups = g.per_channel ? 1 : (g.cols + g.group_size - 1) / g.group_size;
        for (size_t r = 0; r < kRowBlock; ++r) {
          if (r < valid) {
            const uint8_t* row = src + (r0 + r) * ld_q;
            for (size_t k = 0; k < g.cols; ++k) {
              const size_t kk = col0 + k;
              const int code = (row[kk / 2] >> (kk % 2 ? 4 : 0)) & 0xf;
              blk[int4_offset(r, k)] = uint8_t((blk[int4_offset(r, k)] & ~(0xf << int4_shift(k))) | code << int4_shift(k));
            }
          }
          for (size_t grp = 0; grp < g.groups; ++grp) {
            const bool real = r < valid && grp < real_groups;
            const size_t si = (r0 + r) * scales_ld + (g.per_channel ? 0 : g0 + grp);
            sc[grp * kRowBlock + r] = real ? scales[si] : 0.0f;
            if (mn) mn[grp * kRowBlock + r] = real ? mins[si] : 0.0f;
          }
        }
        break;
      }
    }
  }
}

void quantize_matrix(QuantScheme s, uint32_t group_size, const float* w, size_t rows, size_t cols, size_t ld,
                     bool search, void* q, float* scales, float* mins) {
  if (rows == 0 || cols == 0) throw std::invalid_argument("quantize_matrix: empty matrix");
  switch (s) {
    case QuantScheme::kBF16: {
      if (group_size) throw std::invalid_argument("quantize_matrix: BF16 has no groups");
      uint16_t* out = static_cast<uint16_t*>(q);
      for (size_t r = 0; r < rows; ++r)
        for (size_t k = 0; k < cols; ++k) out[r * cols + k] = f32_to_bf16(w[r * ld + k]);
      return;
    }
    case QuantScheme::kInt8PerChannel: {
      if (group_size) throw std::invalid_argument("quantize_matrix: INT8 is per channel (group_size 0)");
      int8_t* out = static_cast<int8_t*>(q);
      for (size_t r = 0; r < rows; ++r) scales[r] = ref::quantize_row_i8(w + r * ld, cols, out + r * cols);
      return;
    }
    case QuantScheme::kInt8Group: {
      if ((group_size != 32 && group_size != 64 && group_size != 128) || cols % group_size)
        throw std::invalid_argument("quantize_matrix: INT8 group size " + std::to_string(group_size) +
                                    " must be 32, 64 or 128 dividing cols " + std::to_string(cols));
      int8_t* out = static_cast<int8_t*>(q);
      const size_t ngroups = cols / group_size;
      for (size_t r = 0; r < rows; ++r)
        for (size_t grp = 0; grp < ngroups; ++grp)
          scales[r * ngroups + grp] =
              ref::quantize_row_i8(w + r * ld + grp * group_size, group_size, out + r * cols + grp * group_size);
      return;
    }
    case QuantScheme::kFP8Block: {
      if ((group_size != 32 && group_size != 64 && group_size != 128) || cols % group_size)
        throw std::invalid_argument("quantize_matrix: FP8 group size " + std::to_string(group_size) +
                                    " must be 32, 64 or 128 dividing cols " + std::to_string(cols));
      uint8_t* out = static_cast<uint8_t*>(q);
      const size_t ngroups = cols / group_size;
      for (size_t r = 0; r < rows; ++r)
        for (size_t grp = 0; grp < ngroups; ++grp)
          scales[r * ngroups + grp] =
              fp8_group_codes(w + r * ld + grp * group_size, group_size, out + r * cols + grp * group_size);
      return;
    }
    case QuantScheme::kInt4Sym:
    case QuantScheme::kInt4Asym: {
      if (cols % 2) throw std::invalid_argument("quantize_matrix: INT4 needs an even number of columns");
      if (group_size && (group_size % kActSumGroup || cols % group_size))
        throw std::invalid_argument("quantize_matrix: group size " + std::to_string(group_size) +
                                    " must be a multiple of 32 dividing cols " + std::to_string(cols));
      const bool sym = s == QuantScheme::kInt4Sym;
      const size_t gs = group_size ? group_size : cols, ngroups = cols / gs;
      uint8_t* out = static_cast<uint8_t*>(q);
      for (size_t r = 0; r < rows; ++r) {
        const float* row = w + r * ld;
        uint8_t* orow = out + r * (cols / 2);
        std::memset(orow, 0, cols / 2);
        for (size_t grp = 0; grp < ngroups; ++grp) {
          const float* x = row + grp * gs;
          float d, lo;
          if (search)
            int4_search_params(sym, x, gs, &d, &lo);
          else
            int4_amax_params(sym, x, 0, ptrdiff_t(gs), &d, &lo);
          const float id = inverse_or_zero(d);
          for (size_t k = 0; k < gs; ++k) {
            const size_t kk = grp * gs + k;
            orow[kk / 2] = uint8_t(orow[kk / 2] | int4_code(sym, x[k], id, lo) << (kk % 2 ? 4 : 0));
          }
          scales[r * ngroups + grp] = d;
          if (!sym) mins[r * ngroups + grp] = lo;
        }
      }
      return;
    }
  }
}

void unpack_matrix(QuantScheme s, const PackedGeometry& g, const void* packed, double* out) {
  const PackedMatrixView v = make_packed_view(s, g, packed);
  for (size_t n = 0; n < g.rows; ++n) {
    const size_t b = n / kRowBlock, r = n % kRowBlock;
    const uint8_t* blk = v.weights + b * g.block_weight_bytes;
    for (size_t k = 0; k < g.cols; ++k) {
      double val = 0.0;
      switch (s) {
        case QuantScheme::kBF16:
          val = bf16_to_f32(reinterpret_cast<const uint16_t*>(blk)[bf16_index(r, k)]);
          break;
        case QuantScheme::kInt8PerChannel:
          val = double(v.scales[b * kRowBlock + r]) * double(int8_t(blk[int8_offset(r, k)]));
          break;
        case QuantScheme::kInt8Group:
          val = double(v.scales[(b * g.groups + k / g.group_size) * kRowBlock + r]) *
                double(int8_t(blk[int8_offset(r, k)]));
          break;
        case QuantScheme::kFP8Block:
          val = double(v.scales[(b * g.groups + k / g.group_size) * kRowBlock + r]) *
                double(fp8_e4m3_to_float(blk[int8_offset(r, k)]));
          break;
        case QuantScheme::kInt4Sym:
        case QuantScheme::kInt4Asym: {
          const int q = (blk[int4_offset(r, k)] >> int4_shift(k)) & 0xf;
          const size_t si = (b * g.groups + k / g.group_size) * kRowBlock + r;
          const double bias = s == QuantScheme::kInt4Sym ? -8.0 * double(v.scales[si]) : double(v.mins[si]);
          val = double(v.scales[si]) * q + bias;
          break;
        }
      }
      out[n * g.cols + k] = val;
    }
  }
}

}  // namespace kt
