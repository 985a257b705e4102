// BF16 x BF16 gate/up and down on AMX tiles: tdpbf16ps multiplies bf16
// activation pairs (the A tiles, gathered into the panel) by the packed bf16
// weights (the B tiles, read in place: 16 packed steps = one 32-k tile) and
// accumulates in fp32 over the whole K. The reference accumulates in double,
// so results agree to fp32 accumulation error, not bit for bit.
#include "amx/amx_common.h"
#include "amx/kernels_amx.h"

namespace kt {
namespace KT_AMX_NS {
namespace {

constexpr size_t kBf16BTileBytes = kTileBytes;                 // 32 k of one row block: 16 steps
constexpr size_t kBf16ATileRowBytes = kBf16PerTile * sizeof(uint16_t);  // 64 bytes of a panel row per tile

static inline void bf16_pass(const Panel& panel, size_t a_tiles, const uint8_t* w0, const uint8_t* w1,
                             size_t k_tiles, CTiles<float>* c) {
  zero_c();
  for (size_t kt = 0; kt < k_tiles; ++kt)
    macro_step<DotBf16>(panel.data() + kt * kBf16ATileRowBytes, panel.stride(), a_tiles, w0 + kt * kBf16BTileBytes,
                        w1 ? w1 + kt * kBf16BTileBytes : nullptr, kStepBytes);
  store_c(c, a_tiles, w1 != nullptr);
}

}  // namespace

void gate_up_bf16w_bf16a__amx(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                              size_t block_end, const ActsView& a, const ActivationParams& act, float* h,
                              size_t ldh) {
  if (a.rows == 0 || block_begin >= block_end) return;
  const PackedGeometry& g = gate.geo;
  const size_t k_tiles = g.cols_padded / kBf16PerTile;
  Panel panel(g.cols_padded * sizeof(uint16_t));
  tile_config(make_config(kTileRowBytes));
  CTiles<float> c;
  alignas(64) float vg[kRowBlock], vu[kRowBlock];
  for (size_t t0 = 0; t0 < a.rows; t0 += kPassTokens) {
    const size_t mt = min_sz(kPassTokens, a.rows - t0);
    const size_t a_tiles = panel.gather(a, t0, mt);
    for (size_t b = block_begin; b < block_end; ++b) {
      bf16_pass(panel, a_tiles, gate.weights + b * g.block_weight_bytes, up.weights + b * g.block_weight_bytes,
                k_tiles, &c);
      const size_t nv = valid_cols(b, g.rows);
      for (size_t t = 0; t < mt; ++t) {
        for (size_t n = 0; n < nv; ++n) {
          vg[n] = c_at(c, t, 0, n);
          vu[n] = c_at(c, t, 1, n);
        }
        activation_cols(vg, vu, nv, act, h + (t0 + t) * ldh + b * kRowBlock);
      }
    }
  }
  tile_release();
  panel.release();
}

void down_bf16w_bf16a__amx(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                           const float* row_weight, float* const* out_rows) {
  if (a.rows == 0 || block_begin >= block_end) return;
  const PackedGeometry& g = w.geo;
  const size_t k_tiles = g.cols_padded / kBf16PerTile;
  Panel panel(g.cols_padded * sizeof(uint16_t));
  tile_config(make_config(kTileRowBytes));
  CTiles<float> c;
  for (size_t t0 = 0; t0 < a.rows; t0 += kPassTokens) {
    const size_t mt = min_sz(kPassTokens, a.rows - t0);
    const size_t a_tiles = panel.gather(a, t0, mt);
    for (size_t b = block_begin; b < block_end; b += 2) {
      const size_t streams = min_sz(2, block_end - b);
      const uint8_t* w0 = w.weights + b * g.block_weight_bytes;
      bf16_pass(panel, a_tiles, w0, streams > 1 ? w0 + g.block_weight_bytes : nullptr, k_tiles, &c);
      for (size_t j = 0; j < streams; ++j) {
        const size_t bj = b + j, nv = valid_cols(bj, g.rows);
        for (size_t t = 0; t < mt; ++t) {
          const float rw = row_weight[t0 + t];
          float* o = out_rows[t0 + t] + bj * kRowBlock;
          for (size_t n = 0; n < nv; ++n) o[n] += rw * c_at(c, t, j, n);
        }
      }
    }
  }
  tile_release();
  panel.release();
}

}  // namespace KT_AMX_NS
}  // namespace kt
