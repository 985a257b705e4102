// INT8 x INT8 gate/up and down on AMX tiles: tdpbusd multiplies u8
// activations (q + 128, the A tiles, gathered into the panel) by the s8
// packed weights (the B tiles, read in place: 16 packed steps = one 64-k
// tile). The int32 sums over the whole K are exact (mod 2^32, like the
// reference's), and the epilogue repeats the reference's fp32 operations in
// order: v = float(acc - comp[n]) * (a_scale * w_scale[n]).
#include "amx/amx_common.h"
#include "amx/kernels_amx.h"

namespace kt {
namespace KT_AMX_NS {
namespace {

constexpr size_t kQ8BTileBytes = kTileBytes;  // 64 k of one row block: 16 steps of 64 bytes

// C = A x B for one pass and two streams over the whole K.
static inline void q8_pass(const Panel& panel, size_t a_tiles, const uint8_t* w0, const uint8_t* w1, size_t k_tiles,
                           CTiles<int32_t>* c) {
  zero_c();
  for (size_t kt = 0; kt < k_tiles; ++kt)
    macro_step<DotBusd>(panel.data() + kt * kI8PerTile, panel.stride(), a_tiles, w0 + kt * kQ8BTileBytes,
                        w1 ? w1 + kt * kQ8BTileBytes : nullptr, kStepBytes);
  store_c(c, a_tiles, w1 != nullptr);
}

// The reference's per-(token, column) value.
static inline float q8_value(int32_t acc, int32_t comp, float a_scale, float w_scale) {
  return float(acc - comp) * (a_scale * w_scale);
}

}  // namespace

void gate_up_q8w_u8a__amx(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                          size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  if (a.rows == 0 || block_begin >= block_end) return;
  const PackedGeometry& g = gate.geo;
  const size_t k_tiles = g.cols_padded / kI8PerTile;
  Panel panel(g.cols_padded);
  tile_config(make_config(kTileRowBytes));
  CTiles<int32_t> c;
  alignas(64) float vg[kRowBlock], vu[kRowBlock];
  for (size_t t0 = 0; t0 < a.rows; t0 += kPassTokens) {
    const size_t mt = min_sz(kPassTokens, a.rows - t0);
    const size_t a_tiles = panel.gather(a, t0, mt);
    for (size_t b = block_begin; b < block_end; ++b) {
      q8_pass(panel, a_tiles, gate.weights + b * g.block_weight_bytes, up.weights + b * g.block_weight_bytes, k_tiles,
              &c);
      const size_t nv = valid_cols(b, g.rows);
      const float* gs = gate.scales + b * kRowBlock;
      const float* us = up.scales + b * kRowBlock;
      const int32_t* gc = gate.compensation + b * kRowBlock;
      const int32_t* uc = up.compensation + b * kRowBlock;
      for (size_t t = 0; t < mt; ++t) {
        const float as = a.row_scale[act_row(a, t0 + t)];
        for (size_t n = 0; n < nv; ++n) {
          vg[n] = q8_value(c_at(c, t, 0, n), gc[n], as, gs[n]);
          vu[n] = q8_value(c_at(c, t, 1, n), uc[n], as, us[n]);
        }
        activation_cols(vg, vu, nv, act, h + (t0 + t) * ldh + b * kRowBlock);
      }
    }
  }
  tile_release();
  panel.release();
}

void down_q8w_u8a__amx(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                       const float* row_weight, float* const* out_rows) {
  if (a.rows == 0 || block_begin >= block_end) return;
  const PackedGeometry& g = w.geo;
  const size_t k_tiles = g.cols_padded / kI8PerTile;
  Panel panel(g.cols_padded);
  tile_config(make_config(kTileRowBytes));
  CTiles<int32_t> c;
  for (size_t t0 = 0; t0 < a.rows; t0 += kPassTokens) {
    const size_t mt = min_sz(kPassTokens, a.rows - t0);
    const size_t a_tiles = panel.gather(a, t0, mt);
    for (size_t b = block_begin; b < block_end; b += 2) {
      const size_t streams = min_sz(2, block_end - b);
      const uint8_t* w0 = w.weights + b * g.block_weight_bytes;
      q8_pass(panel, a_tiles, w0, streams > 1 ? w0 + g.block_weight_bytes : nullptr, k_tiles, &c);
      for (size_t j = 0; j < streams; ++j) {
        const size_t bj = b + j, nv = valid_cols(bj, g.rows);
        const float* ws = w.scales + bj * kRowBlock;
        const int32_t* comp = w.compensation + bj * kRowBlock;
        for (size_t t = 0; t < mt; ++t) {
          const float as = a.row_scale[act_row(a, t0 + t)];
          const float rw = row_weight[t0 + t];
          float* o = out_rows[t0 + t] + bj * kRowBlock;
          for (size_t n = 0; n < nv; ++n) o[n] += rw * q8_value(c_at(c, t, j, n), comp[n], as, ws[n]);
        }
      }
    }
  }
  tile_release();
  panel.release();
}

}  // namespace KT_AMX_NS
}  // namespace kt
