// Scalar reference kernels: the oracle every optimised backend is tested
// against, and the "scalar" backend that runs where nothing better exists.
//
// They read the packed layout of packed_matrix.h element by element and
// spell out the exact arithmetic each format promises:
//   * activations quantised per row: scale = amax / 127, q = rint(x * (127 / amax))
//     (fp32 operations in this order; numpy can replay them bit for bit);
//     a row holding Inf or NaN gets scale NaN (docs/DESIGN_NOTES.md,
//     "Non-finite values");
//   * integer dot products accumulated exactly in int32;
//   * the fp32 epilogues below, with explicit fmaf where an FMA is part of
//     the contract, so SIMD backends can reproduce integer formats bit-exactly.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kt_kernel/cpu_features.h"
#include "kt_kernel/kernel_table.h"
#include "kt_kernel/types.h"
#include "reference/kernels_reference.h"

namespace kt {
namespace ref {

float activation(float g, float u, const ActivationParams& p) {
  if (p.swiglu_limit <= 0.0f) return g / (1.0f + std::exp(-g)) * u;
  // The clamps keep a NaN (as torch.clamp in GPT-OSS's reference does);
  // fmin/fmax would replace it by the bound and launder a bad token.
  const float lim = p.swiglu_limit;
  const float gl = g > lim ? lim : g;
  const float ul = u > lim ? lim : (u < -lim ? -lim : u);
  return gl / (1.0f + std::exp(-p.swiglu_alpha * gl)) * (ul + 1.0f);
}

float quantize_row_i8(const float* x, size_t k, int8_t* q) {
  // amax over the magnitudes, a NaN sticking once seen: the SIMD encoders
  // take the integer max of the magnitudes' bit patterns, which orders
  // finite < Inf < NaN, and this is the same maximum.
  float amax = 0.0f;
  for (size_t i = 0; i < k; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax || std::isnan(a)) amax = a;
  }
  // A row holding Inf or NaN gets scale NaN, so every product with it is
  // NaN: with scale amax / 127 an Inf would give Inf or Inf * 0 = NaN
  // depending on the weights, and a NaN skipped by the max would vanish.
  // Its codes are those of inv = 0 (finite -> 0, Inf and NaN -> 127).
  const bool finite = amax <= std::numeric_limits<float>::max();
  const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
  for (size_t i = 0; i < k; ++i) {
    float v = std::nearbyint(x[i] * inv);
    v = std::fmax(-127.0f, std::fmin(127.0f, v));
    q[i] = static_cast<int8_t>(v);
  }
  return finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
}

void bf16_to_f32_row(const uint16_t* src, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void f32_to_bf16_row(const float* src, size_t n, uint16_t* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

namespace {

void prepare_acts_bf16(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data + r * out.row_bytes);
    for (size_t i = 0; i < k; ++i) dst[i] = f32_to_bf16(x[r * ldx + i]);
    for (size_t i = k; i < kp; ++i) dst[i] = 0;
  }
}

void prepare_acts_int8(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    int8_t* q = reinterpret_cast<int8_t*>(out.data + r * out.row_bytes);
    out.row_scale[r] = quantize_row_i8(x + r * ldx, k, q);
    // u8 encoding for vpdpbusd / tdpbusd: q + 128 (the weights' compensation undoes it).
    for (size_t i = 0; i < k; ++i) out.data[r * out.row_bytes + i] = uint8_t(int(q[i]) + 128);
    for (size_t i = k; i < kp; ++i) out.data[r * out.row_bytes + i] = 128;
  }
}

void prepare_acts_int4(const float* x, size_t rows, size_t k, size_t ldx, const ActsBuffer& out) {
  const size_t kp = round_up(k, kColPad);
  for (size_t r = 0; r < rows; ++r) {
    int8_t* q = reinterpret_cast<int8_t*>(out.data + r * out.row_bytes);
    out.row_scale[r] = quantize_row_i8(x + r * ldx, k, q);
    for (size_t i = k; i < kp; ++i) q[i] = 0;
    int32_t* sums = out.group_sums + r * out.group_sums_stride;
    for (size_t j = 0; j < kp / kActSumGroup; ++j) {
      int32_t s = 0;
      for (size_t i = 0; i < kActSumGroup; ++i) s += q[j * kActSumGroup + i];
      sums[j] = s;
    }
  }
}

size_t act_row(const ActsView& a, size_t m) { return a.row_index ? size_t(a.row_index[m]) : m; }

// One output row n of w against activation row m of a, in fp32, per the
// format's contract.
float dot_row(const PackedMatrixView& w, size_t n, const ActsView& a, size_t m) {
  const PackedGeometry& g = w.geo;
  const size_t b = n / kRowBlock, r = n % kRowBlock;
  const uint8_t* blk = w.weights + b * g.block_weight_bytes;
  const size_t ar = act_row(a, m);
  const uint8_t* act = a.data + ar * a.row_bytes;
  switch (w.scheme) {
    case QuantScheme::kBF16: {
      const uint16_t* wb = reinterpret_cast<const uint16_t*>(blk);
      const uint16_t* ab = reinterpret_cast<const uint16_t*>(act);
      double acc = 0.0;
      for (size_t k = 0; k < g.cols_padded; ++k) {
        const size_t step = k / 2, t = k % 2;
        acc += double(bf16_to_f32(wb[step * 32 + 2 * r + t])) * double(bf16_to_f32(ab[k]));
      }
      return float(acc);
    }
    case QuantScheme::kInt8PerChannel: {
      int32_t acc = 0;
      for (size_t k = 0; k < g.cols_padded; ++k) {
        const size_t step = k / 4, t = k % 4;
        acc += int32_t(act[k]) * int32_t(int8_t(blk[step * kStepBytes + 4 * r + t]));
      }
      const int32_t comp = w.compensation[b * kRowBlock + r];
      return float(acc - comp) * (a.row_scale[ar] * w.scales[b * kRowBlock + r]);
    }
    case QuantScheme::kInt8Group: {
      float acc = 0.0f;
      for (size_t grp = 0; grp < g.groups; ++grp) {
        int32_t dot = 0;
        for (size_t k = grp * g.group_size; k < (grp + 1) * g.group_size; ++k) {
          const size_t step = k / 4, t = k % 4;
          dot += int32_t(act[k]) * int32_t(int8_t(blk[step * kStepBytes + 4 * r + t]));
        }
        const size_t si = (b * g.groups + grp) * kRowBlock + r;
        acc = std::fma(float(dot - w.compensation[si]), w.scales[si], acc);
      }
      return acc * a.row_scale[ar];
    }
    case QuantScheme::kFP8Block: {
      // Per group: exact e4m3 decode, products and sums in double; groups
      // scaled and summed in double in group order, rounded once.
      const uint16_t* ab = reinterpret_cast<const uint16_t*>(act);
      double acc = 0.0;
      for (size_t grp = 0; grp < g.groups; ++grp) {
        double dot = 0.0;
        for (size_t k = grp * g.group_size; k < (grp + 1) * g.group_size; ++k) {
          const size_t step = k / 4, t = k % 4;
          dot += double(fp8_e4m3_to_float(blk[step * kStepBytes + 4 * r + t])) * double(bf16_to_f32(ab[k]));
        }
        acc += double(w.scales[(b * g.groups + grp) * kRowBlock + r]) * dot;
      }
      return float(acc);
    }
    case QuantScheme::kInt4Sym:
    case QuantScheme::kInt4Asym: {
      const int8_t* as = reinterpret_cast<const int8_t*>(act);
      const int32_t* sums = a.group_sums + ar * a.group_sums_stride;
      float acc = 0.0f;
      for (size_t grp = 0; grp < g.groups; ++grp) {
        int32_t dot = 0, asum = 0;
        for (size_t k = grp * g.group_size; k < (grp + 1) * g.group_size; ++k) {
          const size_t step = k / 8, t = k % 8;
          const uint8_t byte = blk[step * kStepBytes + 4 * r + (t & 3)];
          const int32_t q4 = t < 4 ? (byte & 0xf) : (byte >> 4);
          dot += q4 * int32_t(as[k]);
        }
        for (size_t j = grp * g.group_size / kActSumGroup; j < (grp + 1) * g.group_size / kActSumGroup; ++j)
          asum += sums[j];
        const size_t si = (b * g.groups + grp) * kRowBlock + r;
        if (w.scheme == QuantScheme::kInt4Sym) {
          acc = std::fma(float(dot - 8 * asum), w.scales[si], acc);
        } else {
          acc = std::fma(float(dot), w.scales[si], acc);
          acc = std::fma(float(asum), w.mins[si], acc);
        }
      }
      return acc * a.row_scale[ar];
    }
  }
  return 0.0f;
}

void gate_up(const PackedMatrixView& gate, const PackedMatrixView& up, size_t block_begin, size_t block_end,
             const ActsView& a, const ActivationParams& act, float* h, size_t ldh) {
  const size_t n_end = std::min<size_t>(block_end * kRowBlock, gate.geo.rows);
  for (size_t m = 0; m < a.rows; ++m)
    for (size_t n = block_begin * kRowBlock; n < n_end; ++n)
      h[m * ldh + n] = activation(dot_row(gate, n, a, m), dot_row(up, n, a, m), act);
}

void down(const PackedMatrixView& w, size_t block_begin, size_t block_end, const ActsView& a,
          const float* row_weight, float* const* out_rows) {
  const size_t n_end = std::min<size_t>(block_end * kRowBlock, w.geo.rows);
  for (size_t m = 0; m < a.rows; ++m)
    for (size_t n = block_begin * kRowBlock; n < n_end; ++n)
      out_rows[m][n] += row_weight[m] * dot_row(w, n, a, m);
}

}  // namespace
}  // namespace ref

void fill_kernels_scalar(KernelTable* t, const CpuFeatures&) {
  for (int s = 0; s < kNumSchemes; ++s) {
    t->formats[s].gate_up = ref::gate_up;
    t->formats[s].down = ref::down;
  }
  t->formats[int(QuantScheme::kBF16)].prepare_acts = ref::prepare_acts_bf16;
  t->formats[int(QuantScheme::kInt8PerChannel)].prepare_acts = ref::prepare_acts_int8;
  t->formats[int(QuantScheme::kInt4Sym)].prepare_acts = ref::prepare_acts_int4;
  t->formats[int(QuantScheme::kInt4Asym)].prepare_acts = ref::prepare_acts_int4;
  t->formats[int(QuantScheme::kInt8Group)].prepare_acts = ref::prepare_acts_int8;
  t->formats[int(QuantScheme::kFP8Block)].prepare_acts = ref::prepare_acts_bf16;
  t->convert.bf16_to_f32 = ref::bf16_to_f32_row;
  t->convert.f32_to_bf16 = ref::f32_to_bf16_row;
}

}  // namespace kt
