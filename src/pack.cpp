// Quantisation and packing of weights into the layout of packed_matrix.h,
// and the exact inverse. Runs at load time, at baseline flags.
#include "kt_kernel/pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "reference/kernels_reference.h"

namespace kt {
namespace {

float load_elem(const void* src, DType dt, size_t i) {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(src)[i];
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::kF64: return float(static_cast<const double*>(src)[i]);
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
        if (sym) {
          float m = 0.0f;
          for (ptrdiff_t k = s0; k < s1; ++k)
            if (std::fabs(w[k]) > std::fabs(m)) m = w[k];
          d = m / -8.0f;
          const float id = d != 0.0f ? 1.0f / d : 0.0f;
          for (size_t k = k0; k < k1; ++k) {
            const int q = int(std::fmax(0.0f, std::fmin(15.0f, std::nearbyint(w[k] * id) + 8.0f)));
            blk[int4_offset(r, k)] = uint8_t((blk[int4_offset(r, k)] & ~(0xf << int4_shift(k))) | q << int4_shift(k));
          }
        } else {
          float hi = w[s0];
          lo = w[s0];
          for (ptrdiff_t k = s0; k < s1; ++k) {
            lo = std::fmin(lo, w[k]);
            hi = std::fmax(hi, w[k]);
          }
          d = (hi - lo) / 15.0f;
          const float id = d != 0.0f ? 1.0f / d : 0.0f;
          for (size_t k = k0; k < k1; ++k) {
            const int q = int(std::fmax(0.0f, std::fmin(15.0f, std::nearbyint((w[k] - lo) * id))));
            blk[int4_offset(r, k)] = uint8_t((blk[int4_offset(r, k)] & ~(0xf << int4_shift(k))) | q << int4_shift(k));
          }
        }
      }
      scales[grp * kRowBlock + r] = d;
      if (mins) mins[grp * kRowBlock + r] = lo;
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
