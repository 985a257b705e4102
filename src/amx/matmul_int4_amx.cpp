// INT4 x INT8 gate/up and down on AMX tiles, symmetric or with mins (by
// w.scheme), per channel or per group of K.
//
// Our INT4 product is u4 weights x s8 activations, so the tiles run tdpbsud
// with A = s8 activations (gathered into the panel) and B = the weight
// nibbles unpacked to u8 bytes in B-tile order: one packed 8-k step gives two
// B rows (low nibbles: k0..k0+3, high nibbles: k0+4..k0+7), so a 64-k tile
// unpacks 8 steps (512 bytes) into 1 KiB of scratch that stays in L1.
//
// Each scale group is one int32 tile accumulation (C zeroed, group_size / 64
// tiles of 64 k; a group of 32 uses 32-k tiles: A colsb 32, B 8 rows), then
// the reference's fp32 epilogue in group order:
//   symmetric:  acc = fmaf(float(dot_g - 8 * asum_g), scale_g, acc)
//   with mins:  acc = fmaf(float(dot_g), scale_g, acc); acc = fmaf(float(asum_g), min_g, acc)
// and v = acc * a_scale; asum_g sums the activation's per-32 sums over the
// group. Integer dots are exact and fmaf is correctly rounded, so the result
// is the reference's bit for bit.
#include "amx/amx_common.h"
#include "amx/kernels_amx.h"

namespace kt {
namespace KT_AMX_NS {
namespace {

constexpr size_t kQ4KPerStep = 8;  // k per packed INT4 step (two B-tile rows)

// Unpacks packed steps [s0, s0 + n) of one row block into 2n B-tile rows of u8.
static inline void unpack_q4_rows(const uint8_t* block, size_t s0, size_t n, uint8_t* out) {
  const uint8_t* src = block + s0 * kStepBytes;
  for (size_t s = 0; s < n; ++s) {
    uint8_t* lo = out + (2 * s) * kTileRowBytes;
    uint8_t* hi = lo + kTileRowBytes;
    for (size_t i = 0; i < kStepBytes; ++i) {
      lo[i] = uint8_t(src[s * kStepBytes + i] & 0x0f);
      hi[i] = uint8_t(src[s * kStepBytes + i] >> 4);
    }
  }
}

// One pass's geometry of a packed INT4 matrix.
struct Q4Plan {
  size_t groups, group_size;
  size_t k_tile;          // k per tile: 64, or 32 for groups of 32
  size_t tiles_per_group;
  size_t sums_per_group;  // activation per-32 sums per group
  bool asym;
};

static inline Q4Plan q4_plan(const PackedMatrixView& w) {
  Q4Plan p;
  p.groups = w.geo.groups;
  p.group_size = w.geo.group_size;
  p.k_tile = p.group_size % kI8PerTile == 0 ? kI8PerTile : kI4GroupTile;
  p.tiles_per_group = p.group_size / p.k_tile;
  p.sums_per_group = p.group_size / kActSumGroup;
  p.asym = w.scheme == QuantScheme::kInt4Asym;
  return p;
}

// One weight stream: a row block's nibbles, scales and mins.
struct Q4Stream {
  const uint8_t* w;
  const float* scales;  // [groups][16]
  const float* mins;    // [groups][16], asymmetric only
};

static inline Q4Stream q4_stream(const PackedMatrixView& w, size_t b) {
  const size_t groups = w.geo.groups;
  Q4Stream s;
  s.w = w.weights + b * w.geo.block_weight_bytes;
  s.scales = w.scales + b * groups * kRowBlock;
  s.mins = w.mins ? w.mins + b * groups * kRowBlock : nullptr;
  return s;
}

// The tokens of one pass: their per-32 activation sums and scales.
struct Q4Tokens {
  const int32_t* sums[kPassTokens];
  float scale[kPassTokens];
};

static inline void q4_tokens(const ActsView& a, size_t t0, size_t mt, Q4Tokens* tk) {
  for (size_t t = 0; t < mt; ++t) {
    const size_t r = act_row(a, t0 + t);
    tk->sums[t] = a.group_sums + r * a.group_sums_stride;
    tk->scale[t] = a.row_scale[r];
  }
}

// acc[j][t][n]: fp32 group accumulators of stream j, token t, column n.
struct Q4Acc {
  alignas(64) float v[2][kPassTokens][kRowBlock];
};

// The full K of one pass and one or two streams: per group, an int32 tile
// accumulation and the fp32 epilogue into acc.
static inline void q4_pass(const Q4Plan& p, const Panel& panel, size_t a_tiles, size_t mt, const Q4Tokens& tk,
                           const Q4Stream* st, size_t streams, Q4Acc* acc) {
  alignas(64) uint8_t scratch[2][kTileBytes];
  CTiles<int32_t> c;
  const size_t steps_per_tile = p.k_tile / kQ4KPerStep;
  for (size_t j = 0; j < streams; ++j)
    for (size_t t = 0; t < mt; ++t)
      for (size_t n = 0; n < kRowBlock; ++n) acc->v[j][t][n] = 0.0f;
  for (size_t grp = 0; grp < p.groups; ++grp) {
    zero_c();
    for (size_t i = 0; i < p.tiles_per_group; ++i) {
      const size_t k0 = grp * p.group_size + i * p.k_tile;
      for (size_t j = 0; j < streams; ++j) unpack_q4_rows(st[j].w, k0 / kQ4KPerStep, steps_per_tile, scratch[j]);
      macro_step<DotBsud>(panel.data() + k0, panel.stride(), a_tiles, scratch[0], streams > 1 ? scratch[1] : nullptr,
                          kTileRowBytes);
    }
    store_c(&c, a_tiles, streams > 1);
    for (size_t t = 0; t < mt; ++t) {
      int32_t asum = 0;
      for (size_t s = grp * p.sums_per_group; s < (grp + 1) * p.sums_per_group; ++s) asum += tk.sums[t][s];
      for (size_t j = 0; j < streams; ++j) {
        const float* sc = st[j].scales + grp * kRowBlock;
        float* av = acc->v[j][t];
        if (p.asym) {
          const float* mn = st[j].mins + grp * kRowBlock;
          for (size_t n = 0; n < kRowBlock; ++n) {
            av[n] = fmaf(float(c_at(c, t, j, n)), sc[n], av[n]);
            av[n] = fmaf(float(asum), mn[n], av[n]);
          }
        } else {
          for (size_t n = 0; n < kRowBlock; ++n) av[n] = fmaf(float(c_at(c, t, j, n) - 8 * asum), sc[n], av[n]);
        }
      }
    }
  }
}

}  // namespace

void gate_up_q4w_s8a__amx(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin,
                          size_t block_end, const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  if (a.rows == 0 || block_begin >= block_end) return;
  const PackedGeometry& g = gate.geo;
  const Q4Plan p = q4_plan(gate);
  Panel panel(g.cols_padded);
  tile_config(make_config(p.k_tile));
  Q4Tokens tk;
  Q4Acc acc;
  alignas(64) float vg[kRowBlock], vu[kRowBlock];
  for (size_t t0 = 0; t0 < a.rows; t0 += kPassTokens) {
    const size_t mt = min_sz(kPassTokens, a.rows - t0);
    const size_t a_tiles = panel.gather(a, t0, mt);
    q4_tokens(a, t0, mt, &tk);
    for (size_t b = block_begin; b < block_end; ++b) {
      const Q4Stream st[2] = {q4_stream(gate, b), q4_stream(up, b)};
      q4_pass(p, panel, a_tiles, mt, tk, st, 2, &acc);
      const size_t nv = valid_cols(b, g.rows);
      for (size_t t = 0; t < mt; ++t) {
        for (size_t n = 0; n < nv; ++n) {
          vg[n] = acc.v[0][t][n] * tk.scale[t];
          vu[n] = acc.v[1][t][n] * tk.scale[t];
        }
        activation_cols(vg, vu, nv, act, h + (t0 + t) * ldh + b * kRowBlock);
      }
    }
  }
  tile_release();
  panel.release();
}

void down_q4w_s8a__amx(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
                       const float* row_weight, float* const* out_rows) {
  if (a.rows == 0 || block_begin >= block_end) return;
  const PackedGeometry& g = w.geo;
  const Q4Plan p = q4_plan(w);
  Panel panel(g.cols_padded);
  tile_config(make_config(p.k_tile));
  Q4Tokens tk;
  Q4Acc acc;
  for (size_t t0 = 0; t0 < a.rows; t0 += kPassTokens) {
    const size_t mt = min_sz(kPassTokens, a.rows - t0);
    const size_t a_tiles = panel.gather(a, t0, mt);
    q4_tokens(a, t0, mt, &tk);
    for (size_t b = block_begin; b < block_end; b += 2) {
      const size_t streams = min_sz(2, block_end - b);
      const Q4Stream st[2] = {q4_stream(w, b), q4_stream(w, streams > 1 ? b + 1 : b)};
      q4_pass(p, panel, a_tiles, mt, tk, st, streams, &acc);
      for (size_t j = 0; j < streams; ++j) {
        const size_t bj = b + j, nv = valid_cols(bj, g.rows);
        for (size_t t = 0; t < mt; ++t) {
          const float rw = row_weight[t0 + t];
          float* o = out_rows[t0 + t] + bj * kRowBlock;
          for (size_t n = 0; n < nv; ++n) o[n] += rw * (acc.v[j][t][n] * tk.scale[t]);
        }
      }
    }
  }
  tile_release();
  panel.release();
}

}  // namespace KT_AMX_NS
}  // namespace kt
