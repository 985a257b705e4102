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

// The exact values the kernels use, as float64 [rows][cols]
// (INT4: scale * q + bias evaluated in double, which is exact).
void unpack_matrix(QuantScheme s, const PackedGeometry& g, const void* packed, double* out);

}  // namespace kt
