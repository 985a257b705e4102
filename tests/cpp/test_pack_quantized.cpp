// Packing from already-quantised (canonical) data, the path converted files
// take: it must reproduce pack_matrix byte for byte, per K slice too, and the
// per-expert MoeLayer load must equal load_dense on any number of slices.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include "kt_kernel/moe_layer.h"
#include "kt_kernel/pack.h"
#include "thread_pool.h"
#include "test_support.h"

namespace kt {
namespace {

using test::normal_floats;

struct Canonical {
  std::vector<uint8_t> q;
  std::vector<float> scales, mins;
  size_t ld_q = 0, scales_ld = 0;
};

Canonical quantize(QuantScheme s, uint32_t group, const std::vector<float>& w, size_t rows, size_t cols, bool search) {
  Canonical c;
  c.ld_q = scheme_is_int4(s) ? cols / 2 : cols;
  c.q.resize(rows * c.ld_q * (s == QuantScheme::kBF16 ? 2 : 1));
  c.scales_ld = quantized_scale_cols(s, group, cols);
  c.scales.resize(rows * c.scales_ld + 1);
  c.mins.resize(rows * c.scales_ld + 1);
  quantize_matrix(s, group, w.data(), rows, cols, cols, search, c.q.data(), c.scales.data(), c.mins.data());
  return c;
}

struct Case {
  QuantScheme s;
  uint32_t group;
};
const Case kCases[] = {{QuantScheme::kBF16, 0},     {QuantScheme::kInt8PerChannel, 0}, {QuantScheme::kInt4Sym, 32},
                       {QuantScheme::kInt4Sym, 0},  {QuantScheme::kInt4Asym, 64},      {QuantScheme::kInt4Asym, 0},
                       {QuantScheme::kInt8Group, 32}, {QuantScheme::kInt8Group, 128},
                       {QuantScheme::kFP8Block, 128}, {QuantScheme::kFP8Block, 32}};

TEST(PackQuantized, ReproducesPackMatrixForWholeMatricesAndKSlices) {
  for (const Case& c : kCases) {
    for (size_t rows : {1, 17, 33}) {
      const size_t cols = 256;
      const auto w = normal_floats(size_t(rows) * cols, uint32_t(rows * 7 + c.group));
      const Canonical q = quantize(c.s, c.group, w, rows, cols, false);
      for (size_t col0 : {size_t(0), size_t(128)}) {
        PackedGeometry g;
        ASSERT_TRUE(packed_geometry(c.s, uint32_t(rows), uint32_t(cols - col0), c.group, &g));
        std::vector<uint8_t> a(g.total_bytes, 0xAB), b(g.total_bytes, 0xCD);
        pack_matrix(c.s, g, w.data(), DType::kF32, cols, a.data(), col0, cols);
        pack_quantized_blocks(c.s, g, q.q.data(), q.ld_q, q.scales.data(), q.mins.data(), q.scales_ld, b.data(), 0,
                              g.rows_padded / kRowBlock, col0);
        EXPECT_EQ(a, b) << "scheme " << int(c.s) << " group " << c.group << " rows " << rows << " col0 " << col0;
      }
    }
  }
}

// GGUF Q8_0 into grouped INT8 (group 32): the codes and the fp16 scales
// (widened to fp32) are stored as given, so unpacking returns d * q exactly,
// also for a K slice; compensation = 128 * sum of each group's codes.
TEST(PackQuantized, Int8GroupIsLosslessForQ8_0) {
  const size_t rows = 19, cols = 256;
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> code(-128, 127);
  std::uniform_int_distribution<int> mant(0, 1023), ex(-14, 0);
  std::vector<int8_t> q(rows * cols);
  for (auto& v : q) v = int8_t(code(rng));  // including -128, which Q8_0 may hold
  std::vector<float> d(rows * cols / 32);
  for (auto& v : d) v = std::ldexp(1.0f + float(mant(rng)) / 1024.0f, ex(rng) - 8);  // fp16-representable
  for (size_t col0 : {size_t(0), size_t(128)}) {
    PackedGeometry g;
    ASSERT_TRUE(packed_geometry(QuantScheme::kInt8Group, uint32_t(rows), uint32_t(cols - col0), 32, &g));
    std::vector<uint8_t> p(g.total_bytes, 0xAB);
    pack_quantized_blocks(QuantScheme::kInt8Group, g, q.data(), cols, d.data(), nullptr, cols / 32, p.data(), 0,
                          g.rows_padded / kRowBlock, col0);
    std::vector<double> out(rows * g.cols);
    unpack_matrix(QuantScheme::kInt8Group, g, p.data(), out.data());
    for (size_t r = 0; r < rows; ++r)
      for (size_t k = 0; k < g.cols; ++k)
        ASSERT_EQ(out[r * g.cols + k], double(d[r * (cols / 32) + (col0 + k) / 32]) * q[r * cols + col0 + k]);
    const PackedMatrixView v = make_packed_view(QuantScheme::kInt8Group, g, p.data());
    for (size_t r = 0; r < rows; ++r)
      for (size_t grp = 0; grp < g.groups; ++grp) {
        int32_t sum = 0;
        for (size_t k = 0; k < 32; ++k) sum += q[r * cols + col0 + grp * 32 + k];
        ASSERT_EQ(v.compensation[((r / 16) * g.groups + grp) * 16 + r % 16], 128 * sum);
      }
  }
}

// The e4m3 decode against a table built from the definition (sign, 4-bit
// exponent bias 7, 3-bit mantissa, subnormals, 0x7f / 0xff NaN), all 256 codes.
TEST(PackQuantized, Fp8E4m3DecodeMatchesTheDefinition) {
  for (int c = 0; c < 256; ++c) {
    const int e = (c >> 3) & 15, m = c & 7;
    const double sign = (c & 0x80) ? -1.0 : 1.0;
    const float v = fp8_e4m3_to_float(uint8_t(c));
    if (e == 15 && m == 7) {
      EXPECT_TRUE(std::isnan(v)) << c;
      continue;
    }
    const double want = e == 0 ? sign * m / 8.0 * std::ldexp(1.0, -6) : sign * (1.0 + m / 8.0) * std::ldexp(1.0, e - 7);
    EXPECT_EQ(double(v), want) << c;
  }
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), 1.0f / 512);
  EXPECT_TRUE(std::signbit(fp8_e4m3_to_float(0x80)));
}

// FP8 checkpoints (e4m3 codes + per row-and-group fp32 scales, i.e. a
// 128x128 weight_scale_inv expanded per row) pack losslessly: unpacking
// returns scale * e4m3(code) exactly, also for a K slice at a group boundary.
TEST(PackQuantized, Fp8BlockIsLosslessFromCodes) {
  const size_t rows = 37, cols = 384, group = 128;
  std::mt19937 rng(5);
  std::vector<uint8_t> q(rows * cols);
  for (auto& c : q) {
    c = uint8_t(rng());
    if ((c & 0x7f) == 0x7f) c = 0x38;
  }
  std::vector<float> blk(((rows + 127) / 128) * (cols / 128));
  std::uniform_real_distribution<float> sd(1e-4f, 1e-2f);
  for (auto& v : blk) v = sd(rng);
  std::vector<float> sc(rows * (cols / group));
  for (size_t r = 0; r < rows; ++r)
    for (size_t g = 0; g < cols / group; ++g) sc[r * (cols / group) + g] = blk[(r / 128) * (cols / 128) + g];
  for (size_t col0 : {size_t(0), size_t(128), size_t(256)}) {
    PackedGeometry g;
    ASSERT_TRUE(packed_geometry(QuantScheme::kFP8Block, uint32_t(rows), uint32_t(cols - col0), group, &g));
    EXPECT_EQ(g.compensation_offset, 0u);
    std::vector<uint8_t> p(g.total_bytes, 0xAB);
    pack_quantized_blocks(QuantScheme::kFP8Block, g, q.data(), cols, sc.data(), nullptr, cols / group, p.data(), 0,
                          g.rows_padded / kRowBlock, col0);
    std::vector<double> out(rows * g.cols);
    unpack_matrix(QuantScheme::kFP8Block, g, p.data(), out.data());
    for (size_t r = 0; r < rows; ++r)
      for (size_t k = 0; k < g.cols; ++k)
        ASSERT_EQ(out[r * g.cols + k], double(sc[r * (cols / group) + (col0 + k) / group]) *
                                           double(fp8_e4m3_to_float(q[r * cols + col0 + k])))
            << r << " " << k << " col0 " << col0;
  }
  PackedGeometry g;
  ASSERT_TRUE(packed_geometry(QuantScheme::kFP8Block, uint32_t(rows), uint32_t(cols), group, &g));
  std::vector<uint8_t> p(g.total_bytes);
  EXPECT_THROW(pack_quantized_blocks(QuantScheme::kFP8Block, g, q.data(), cols, sc.data(), nullptr, cols / group,
                                     p.data(), 0, 1, 64),
               std::invalid_argument);
}

// Quantising floats to FP8: scale = amax / 448 and round-to-nearest-even
// e4m3 codes, so every value is within half an e4m3 step of the original and
// each group's largest magnitude is exact up to the scale's rounding.
TEST(PackQuantized, Fp8QuantisationRoundsToNearest) {
  const size_t rows = 5, cols = 256;
  auto w = normal_floats(size_t(rows) * cols, 3);
  w[7] = 0.0f;
  for (size_t k = 128; k < 256; ++k) w[2 * cols + k] = 0.0f;  // an all-zero group
  const Canonical c = quantize(QuantScheme::kFP8Block, 128, w, rows, cols, false);
  for (size_t r = 0; r < rows; ++r)
    for (size_t k = 0; k < cols; ++k) {
      const float s = c.scales[r * 2 + k / 128];
      const double v = double(s) * fp8_e4m3_to_float(c.q[r * cols + k]);
      // Best code: no other code is closer.
      double best = 1e300;
      for (int code = 0; code < 256; ++code) {
        if ((code & 0x7f) == 0x7f) continue;
        best = std::min(best, std::fabs(double(s) * fp8_e4m3_to_float(uint8_t(code)) - double(w[r * cols + k])));
      }
      ASSERT_LE(std::fabs(v - w[r * cols + k]), best * (1 + 1e-6) + 1e-30) << r << " " << k;
    }
  EXPECT_EQ(c.scales[2 * 2 + 1], 0.0f);
}

TEST(PackQuantized, ScaleSearchNeverIncreasesTheError) {
  for (QuantScheme s : {QuantScheme::kInt4Sym, QuantScheme::kInt4Asym}) {
    const size_t rows = 32, cols = 128;
    const auto w = normal_floats(size_t(rows) * cols, 3);
    double err[2];
    for (int search = 0; search < 2; ++search) {
      const Canonical q = quantize(s, 32, w, rows, cols, search != 0);
      PackedGeometry g;
      ASSERT_TRUE(packed_geometry(s, rows, cols, 32, &g));
      std::vector<uint8_t> p(g.total_bytes);
      pack_quantized_blocks(s, g, q.q.data(), q.ld_q, q.scales.data(), q.mins.data(), q.scales_ld, p.data(), 0,
                            g.rows_padded / kRowBlock);
      std::vector<double> out(rows * cols);
      unpack_matrix(s, g, p.data(), out.data());
      err[search] = 0;
      for (size_t i = 0; i < out.size(); ++i) err[search] += (out[i] - w[i]) * (out[i] - w[i]);
    }
    EXPECT_LT(err[1], err[0]);
  }
}

TEST(PackQuantized, RejectsAColumnOffsetInsideAGroup) {
  PackedGeometry g;
  ASSERT_TRUE(packed_geometry(QuantScheme::kInt4Sym, 16, 64, 64, &g));
  std::vector<uint8_t> q(16 * 64), p(g.total_bytes);
  std::vector<float> s(16 * 2);
  EXPECT_THROW(pack_quantized_blocks(QuantScheme::kInt4Sym, g, q.data(), 64, s.data(), nullptr, 2, p.data(), 0, 1, 32),
               std::invalid_argument);
}

TEST(MoeLayerPerExpertLoad, QuantizedAndDenseMatchLoadDenseOnTwoSlices) {
  ThreadPool pool(2, {0, 0}, false);
  const uint32_t E = 3, H = 128, I = 256;
  for (const Case& c : kCases) {
    MoeConfig cfg;
    cfg.num_experts = E;
    cfg.top_k = 2;
    cfg.hidden = H;
    cfg.intermediate = I;
    cfg.scheme = c.s;
    cfg.group_size = c.group;
    const auto gate = normal_floats(size_t(E) * I * H, 1), up = normal_floats(size_t(E) * I * H, 2),
               down = normal_floats(size_t(E) * H * I, 3);
    MoeLayer ref(cfg, pool), by_q(cfg, pool), by_d(cfg, pool);
    const uint8_t load[E] = {1, 0, 1};
    ref.load_dense(gate.data(), up.data(), down.data(), DType::kF32, E, nullptr, load);
    by_q.allocate();
    by_d.allocate();
    for (uint32_t e = 0; e < E; ++e) {
      if (!load[e]) continue;
      const std::vector<float> g(gate.begin() + e * I * H, gate.begin() + (e + 1) * I * H),
          u(up.begin() + e * I * H, up.begin() + (e + 1) * I * H), d(down.begin() + e * H * I, down.begin() + (e + 1) * H * I);
      const Canonical qg = quantize(c.s, c.group, g, I, H, false), qu = quantize(c.s, c.group, u, I, H, false),
                      qd = quantize(c.s, c.group, d, H, I, false);
      auto ref_of = [&](const Canonical& q) {
        MoeLayer::QuantizedMatrix m;
        m.q = q.q.data();
        m.ld_q = q.ld_q;
        m.scales = q.scales.data();
        m.mins = q.mins.data();
        m.scales_ld = q.scales_ld;
        return m;
      };
      by_q.load_expert_quantized(e, ref_of(qg), ref_of(qu), ref_of(qd));
      by_d.load_expert_dense(e, g.data(), u.data(), d.data(), DType::kF32);
    }
    for (uint32_t e = 0; e < E; ++e) {
      EXPECT_EQ(by_q.slot_loaded(e), bool(load[e]));
      if (!load[e]) continue;
      for (int which = 0; which < 3; ++which) {
        const size_t n = size_t(I) * H;
        std::vector<double> a(n), b(n), d(n);
        ref.unpack_expert(e, which, a.data());
        by_q.unpack_expert(e, which, b.data());
        by_d.unpack_expert(e, which, d.data());
        EXPECT_EQ(a, b) << "scheme " << int(c.s) << " expert " << e << " matrix " << which;
        EXPECT_EQ(a, d) << "scheme " << int(c.s) << " expert " << e << " matrix " << which;
      }
    }
  }
}

}  // namespace
}  // namespace kt
