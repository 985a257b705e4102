// The packed-weight contract (after FBGEMM's PackBMatrix): geometry and size
// from packed_geometry(), pack() from a plain row-major matrix, unpack()
// back to exact values, equality by bytes. Packing works on any range of
// row blocks, so threads (one NUMA node's threads for its slice) can pack
// their part in parallel and first-touch the pages they will read.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kt_kernel/packed_matrix.h"
#include "kt_kernel/types.h"

namespace kt {

// Quantises and packs row blocks [block_begin, block_end) of the matrix
// src[rows][cols] (row stride `ld` elements of type `dt`) into `dst`, a
// buffer of g.total_bytes laid out per g. Padding rows and columns are
// written too, so dst needs no clearing.
//   INT8:  per row: scale = amax / 127, q = rint(w * 127 / amax).
//   INT8 grouped: the same rule per row and group of K.
//   FP8 block: per row and group of K, scale = amax / 448, code = the e4m3
//          value nearest w / scale (round to nearest even, w / scale in double).
//   INT4 symmetric (llama.cpp Q4_0 rule): per group, d = m / -8 where m is the
//          element of largest magnitude; q = clamp(rint(w / d) + 8, 0, 15).
//   INT4 asymmetric (Q4_1 rule): d = (max - min) / 15, q = clamp(rint((w - min) / d), 0, 15).
// K slices (NUMA): src points at the start of full rows of `full_cols`
// elements and the packed matrix is columns [col0, col0 + g.cols) of them;
// per-channel statistics then cover the full row, so slicing never changes
// a quantised value. full_cols = 0 means g.cols (no slicing, col0 = 0).
void pack_matrix_blocks(QuantScheme s, const PackedGeometry& g, const void* src, DType dt, size_t ld, void* dst,
                        size_t block_begin, size_t block_end, size_t col0 = 0, size_t full_cols = 0);

static inline void pack_matrix(QuantScheme s, const PackedGeometry& g, const void* src, DType dt, size_t ld,
                               void* dst, size_t col0 = 0, size_t full_cols = 0) {
  pack_matrix_blocks(s, g, src, dt, ld, dst, 0, g.rows_padded / kRowBlock, col0, full_cols);
}

// Canonical quantised form of a matrix [rows][cols], the content of converted
// files (what pack_matrix would store, before the shuffle into row blocks):
//   codes  INT8: int8 [rows][ld_q];  INT4: uint8 [rows][ld_q] with two codes
//          per byte, low nibble = even k (ld_q in bytes, >= cols / 2);
//          BF16: uint16 bf16 bits [rows][ld_q]; FP8: uint8 e4m3 codes [rows][ld_q].
//   scales float [rows][scales_ld]: INT8 one per row; INT4, INT8 grouped and FP8 one per row and
//          group of K (one per row when per channel). mins likewise, INT4
//          asymmetric only (else nullptr).
// Number of scale columns of a matrix with `cols` columns: INT4 / INT8 grouped
// cols / group_size, INT4 per channel and INT8 1, BF16 0.
static inline size_t quantized_scale_cols(QuantScheme s, uint32_t group_size, size_t cols) {
  if (s == QuantScheme::kBF16) return 0;
  if (scheme_has_groups(s) && group_size != 0) return cols / group_size;
  return 1;
}

// Packs row blocks [block_begin, block_end) of an already-quantised matrix:
// a lossless shuffle, no re-quantisation. The packed matrix is columns
// [col0, col0 + g.cols) of the canonical rows (a NUMA K slice; for grouped
// INT4 / INT8 col0 must be a multiple of the group size, and even for INT4). `q`,
// `scales` and `mins` point at row 0, column 0 of the full canonical matrix
// (g.rows rows). INT8 compensation = 128 * sum of the slice's codes;
// per-channel scales are shared by all K slices. Padding is written, as by
// pack_matrix_blocks. Throws std::invalid_argument on a misaligned col0.
void pack_quantized_blocks(QuantScheme s, const PackedGeometry& g, const void* q, size_t ld_q, const float* scales,
                           const float* mins, size_t scales_ld, void* dst, size_t block_begin, size_t block_end,
                           size_t col0 = 0);

// Quantises w [rows][cols] (row stride ld floats) into the canonical form
// above (q, scales and mins packed densely: ld_q = cols, cols / 2 or cols;
// scales_ld = quantized_scale_cols). With search = false the codes and
// scales are exactly those pack_matrix stores. With search = true (INT4
// only; INT8 and BF16 ignore it) each group's scale (and min) is chosen from
// a grid around the amax rule, plus a least-squares refit, to minimise the
// group's squared rounding error; the amax rule is one of the candidates, so
// the error never grows. INT4 needs an even cols. Throws std::invalid_argument.
void quantize_matrix(QuantScheme s, uint32_t group_size, const float* w, size_t rows, size_t cols, size_t ld,
                     bool search, void* q, float* scales, float* mins);

// The exact values the kernels use, as float64 [rows][cols]
// (INT4: scale * q + bias evaluated in double, which is exact).
void unpack_matrix(QuantScheme s, const PackedGeometry& g, const void* packed, double* out);

}  // namespace kt
