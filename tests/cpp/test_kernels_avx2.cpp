// The AVX2 backend against the scalar twins, for every format, over hostile
// sizes: rows 1-10, 15-17, 31-33, 64; tokens 1-10, 15-17, 31-33; K with
// padding and partial groups; gathered activation rows (row_index); views
// that start at a column offset; partial block ranges; outputs poisoned with
// NaN (columns outside the range must stay NaN). Where the CPU has AVX-VNNI
// both dot-product paths are run (the registered VNNI one and the maddubs one
// forced through kt::avx2::fill_table).
//
// Tolerances, per format:
//   prepare_acts                 bit-exact
//   INT8 / INT4 down             bit-exact (integer dots, the same fp32 epilogue)
//   INT8 / INT4 gate_up          1e-6 relative per element (only the vector exp differs)
//   BF16 gate_up and down        1e-5 relative to max |ref| (fp32 FMA vs the reference's double sum)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "avx2/kernels_avx2.h"
#include "kt_kernel/cpu_features.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/pack.h"
#include "test_support.h"

namespace kt {
namespace {

using test::normal_floats;

constexpr double kIntGateUpRelTol = 1e-6;
constexpr double kBf16RelTol = 1e-5;
constexpr float kTinyAbs = 1e-30f;  // an exp that overflows in one backend and not the other: 1e-37 vs 0

const size_t kRows[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33, 64};
const size_t kTokens[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33};

#define SKIP_WITHOUT_AVX2()                                                                     \
  do {                                                                                          \
    const std::string why = backend_unavailable_reason("avx2");                                 \
    if (!why.empty()) GTEST_SKIP() << "avx2 backend unavailable: " << why;                      \
  } while (0)

struct Variant {
  std::string name;
  KernelTable table;
};

// The AVX2 tables under test: the registered one (VNNI dots where the CPU has
// AVX-VNNI) and, on such CPUs, the maddubs path forced.
std::vector<Variant> avx2_variants() {
  std::vector<Variant> v;
  const bool vnni = cpu_features().avx_vnni;
  v.push_back({vnni ? "avx2+avxvnni" : "avx2", backend_kernels("avx2")});
  if (vnni) {
    KernelTable t;
    t.name = "avx2";
    avx2::fill_table(&t, false);
    v.push_back({"avx2 (maddubs forced)", t});
  }
  return v;
}

struct Packed {
  std::vector<uint8_t> bytes;
  PackedMatrixView view;
};

Packed pack(QuantScheme s, size_t rows, size_t cols, uint32_t group, uint32_t seed) {
  Packed p;
  PackedGeometry g;
  EXPECT_TRUE(packed_geometry(s, uint32_t(rows), uint32_t(cols), group, &g));
  p.bytes.assign(g.total_bytes + 64, 0);
  // Kernels may assume the 64-byte alignment the library's buffers have.
  uint8_t* base = p.bytes.data() + (64 - reinterpret_cast<uintptr_t>(p.bytes.data()) % 64) % 64;
  const std::vector<float> w = normal_floats(rows * cols, seed);
  pack_matrix(s, g, w.data(), DType::kF32, cols, base);
  p.view = make_packed_view(s, g, base);
  return p;
}

// Encoded activation rows.
struct Acts {
  std::vector<uint8_t> data;
  std::vector<float> scale;
  std::vector<int32_t> sums;
  ActsBuffer buf;
};

Acts alloc_acts(QuantScheme s, size_t rows, size_t k, size_t extra_row_bytes = 0, size_t extra_sums = 0,
                uint8_t fill = 0xcd) {
  Acts a;
  a.buf.row_bytes = acts_row_bytes(s, k) + extra_row_bytes;
  a.buf.group_sums_stride = acts_group_sums_per_row(s, k) ? acts_group_sums_per_row(s, k) + extra_sums : 0;
  a.data.assign(rows * a.buf.row_bytes, fill);
  a.scale.assign(rows, -1.0f);
  a.sums.assign(std::max<size_t>(1, rows * a.buf.group_sums_stride), -12345);
  a.buf.data = a.data.data();
  a.buf.row_scale = a.scale.data();
  a.buf.group_sums = a.sums.data();
  return a;
}

// Index of the first differing element, or -1.
template <class T>
long first_diff(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return long(i);
  return -1;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

struct FormatCase {
  const char* name;
  QuantScheme scheme;
  uint32_t group;
  std::vector<size_t> cols;
};

void PrintTo(const FormatCase& f, std::ostream* os) { *os << f.name; }

const FormatCase kFormats[] = {
    {"bf16", QuantScheme::kBF16, 0, {100, 64, 128, 192}},
    {"int8", QuantScheme::kInt8PerChannel, 0, {100, 64, 128, 192}},
    {"int4sym_per_channel", QuantScheme::kInt4Sym, 0, {100, 64, 192}},
    {"int4sym_g32", QuantScheme::kInt4Sym, 32, {96, 64, 128, 192}},
    {"int4sym_g64", QuantScheme::kInt4Sym, 64, {192, 64}},
    {"int4sym_g128", QuantScheme::kInt4Sym, 128, {128, 256}},
    {"int4asym_per_channel", QuantScheme::kInt4Asym, 0, {100, 64, 192}},
    {"int4asym_g32", QuantScheme::kInt4Asym, 32, {96, 64, 128, 192}},
    {"int4asym_g64", QuantScheme::kInt4Asym, 64, {192, 64}},
    {"int4asym_g128", QuantScheme::kInt4Asym, 128, {128, 256}},
};

class KernelsAvx2Formats : public ::testing::TestWithParam<FormatCase> {};

TEST_P(KernelsAvx2Formats, MatchesScalar) {
  SKIP_WITHOUT_AVX2();
  const FormatCase& f = GetParam();
  const QuantScheme s = f.scheme;
  const bool exact = s != QuantScheme::kBF16;
  const KernelTable& scalar = backend_kernels("scalar");
  const FormatKernels& ref = kernels_for(scalar, s);
  const std::vector<Variant> variants = avx2_variants();
  for (const Variant& v : variants) ASSERT_NE(kernels_for(v.table, s).gate_up, ref.gate_up) << v.name;
  EXPECT_EQ(format_provider("avx2", s), "avx2");

  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t col_align = std::max<size_t>(kColPad, f.group);
  const size_t elem = s == QuantScheme::kBF16 ? 2 : 1;
  uint32_t case_id = 0;
  for (size_t cols : f.cols) {
    for (size_t rows : kRows) {
      const Packed gate = pack(s, rows, cols, f.group, 1000 + uint32_t(rows * 7 + cols));
      const Packed up = pack(s, rows, cols, f.group, 2000 + uint32_t(rows * 7 + cols));
      const PackedMatrixView& down = up.view;  // any matrix of this geometry
      const size_t blocks = gate.view.geo.rows_padded / kRowBlock;
      for (size_t tokens : kTokens) {
        ++case_id;
        SCOPED_TRACE(::testing::Message() << f.name << " rows=" << rows << " cols=" << cols << " tokens=" << tokens
                                          << " case=" << case_id);
        // Activations: a wider row (columns [col0, col0 + cols) are viewed), a
        // few spare rows for the gather, one all-zero row.
        const size_t col0 = case_id % 2 ? col_align : 0;
        const size_t kfull = col0 + cols;
        const size_t act_rows = tokens + 2;
        std::vector<float> x = normal_floats(act_rows * kfull, 3000 + case_id);
        if (case_id % 5 == 0) std::fill(x.begin(), x.begin() + kfull, 0.0f);
        Acts qa = alloc_acts(s, act_rows, kfull);
        ref.prepare_acts(x.data(), act_rows, kfull, kfull, qa.buf);
        for (const Variant& v : variants) {
          Acts qb = alloc_acts(s, act_rows, kfull);
          kernels_for(v.table, s).prepare_acts(x.data(), act_rows, kfull, kfull, qb.buf);
          ASSERT_EQ(first_diff(qa.data, qb.data), -1) << v.name << " prepare_acts data (byte)";
          ASSERT_EQ(first_diff(qa.scale, qb.scale), -1) << v.name << " prepare_acts scale (row)";
          ASSERT_EQ(first_diff(qa.sums, qb.sums), -1) << v.name << " prepare_acts group sums";
        }
        std::vector<int32_t> row_index(tokens);
        const bool gather = (case_id / 2) % 2 == 1;
        std::mt19937 rng(case_id);
        for (auto& r : row_index) r = int32_t(rng() % act_rows);
        ActsView a;
        a.data = qa.buf.data + col0 * elem;
        a.row_bytes = qa.buf.row_bytes;
        a.row_scale = qa.buf.row_scale;
        a.group_sums = qa.buf.group_sums_stride ? qa.buf.group_sums + col0 / kActSumGroup : nullptr;
        a.group_sums_stride = qa.buf.group_sums_stride;
        a.row_index = gather ? row_index.data() : nullptr;
        a.rows = tokens;

        // Block range: all, all but the first, or all but the last.
        size_t bb = 0, be = blocks;
        if (blocks > 1 && case_id % 3 == 1) bb = 1;
        if (blocks > 1 && case_id % 3 == 2) be = blocks - 1;
        const size_t n0 = bb * kRowBlock, n1 = std::min(be * kRowBlock, rows);
        ActivationParams act;
        if ((case_id / 4) % 2) {
          act.swiglu_limit = 7.0f;
          act.swiglu_alpha = 1.702f;
        }

        // gate_up into NaN-poisoned h with padding columns.
        const size_t ldh = rows + 3;
        std::vector<float> h_ref(tokens * ldh, nan);
        ref.gate_up(gate.view, up.view, bb, be, a, act, h_ref.data(), ldh);
        // down into rows reached through out_rows, in reverse token order.
        const size_t ldy = rows + 5;
        std::vector<float> y_init(tokens * ldy, nan);
        std::vector<float> init = normal_floats(tokens * ldy, 4000 + case_id);
        for (size_t m = 0; m < tokens; ++m)
          for (size_t n = n0; n < n1; ++n) y_init[m * ldy + n] = init[m * ldy + n];
        const std::vector<float> row_weight = normal_floats(tokens, 5000 + case_id);
        std::vector<float> y_ref = y_init;
        std::vector<float*> out_ref(tokens);
        for (size_t m = 0; m < tokens; ++m) out_ref[m] = y_ref.data() + (tokens - 1 - m) * ldy;
        ref.down(down, bb, be, a, row_weight.data(), out_ref.data());
        double h_max = 0.0, y_max = 0.0;
        for (size_t m = 0; m < tokens; ++m)
          for (size_t n = n0; n < n1; ++n) {
            h_max = std::max(h_max, std::fabs(double(h_ref[m * ldh + n])));
            y_max = std::max(y_max, std::fabs(double(y_ref[m * ldy + n])));
          }

        for (const Variant& v : variants) {
          SCOPED_TRACE(v.name);
          const FormatKernels& k = kernels_for(v.table, s);
          std::vector<float> h(tokens * ldh, nan);
          k.gate_up(gate.view, up.view, bb, be, a, act, h.data(), ldh);
          for (size_t m = 0; m < tokens; ++m)
            for (size_t n = 0; n < ldh; ++n) {
              const float r = h_ref[m * ldh + n], got = h[m * ldh + n];
              if (n < n0 || n >= n1) {
                ASSERT_TRUE(same_bits(got, nan)) << "gate_up wrote outside its columns at m=" << m << " n=" << n;
                continue;
              }
              const double tol = exact ? kIntGateUpRelTol * std::fabs(r) + kTinyAbs : kBf16RelTol * h_max + kTinyAbs;
              ASSERT_NEAR(got, r, tol) << "gate_up m=" << m << " n=" << n;
            }

          std::vector<float> y = y_init;
          std::vector<float*> out(tokens);
          for (size_t m = 0; m < tokens; ++m) out[m] = y.data() + (tokens - 1 - m) * ldy;
          k.down(down, bb, be, a, row_weight.data(), out.data());
          if (exact) {
            ASSERT_EQ(0, std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float))) << "down not bit-exact";
          } else {
            for (size_t i = 0; i < y.size(); ++i) {
              const size_t n = i % ldy;
              if (n < n0 || n >= n1)
                ASSERT_TRUE(same_bits(y[i], nan)) << "down wrote outside its columns at " << i;
              else
                ASSERT_NEAR(y[i], y_ref[i], kBf16RelTol * y_max) << "down at " << i;
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, KernelsAvx2Formats, ::testing::ValuesIn(kFormats),
                         [](const ::testing::TestParamInfo<FormatCase>& i) { return std::string(i.param.name); });

TEST(KernelsAvx2, PrepareActsBitExactOnHostileRows) {
  SKIP_WITHOUT_AVX2();
  const KernelTable& scalar = backend_kernels("scalar");
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float denorm = std::numeric_limits<float>::denorm_min();
  for (const Variant& v : avx2_variants())
    for (QuantScheme s : {QuantScheme::kBF16, QuantScheme::kInt8PerChannel, QuantScheme::kInt4Sym, QuantScheme::kInt4Asym})
      for (size_t k : {1, 2, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 200}) {
        SCOPED_TRACE(::testing::Message() << v.name << " scheme=" << int(s) << " k=" << k);
        const size_t rows = 7, ldx = k + 3;
        std::vector<float> x = normal_floats(rows * ldx, uint32_t(k), 3.0f);
        for (size_t i = 0; i < k; ++i) {
          x[0 * ldx + i] = 0.0f;                                            // amax = 0
          x[2 * ldx + i] *= 1e30f;                                          // huge
          x[3 * ldx + i] = float(int(i % 7) - 3) * denorm;                  // subnormal only
          x[4 * ldx + i] = i == 0 ? 127.0f : float(int(i % 9) - 4) + 0.5f;  // ties: inv = 1
          x[5 * ldx + i] = i % 2 ? -0.0f : 0.0f;
        }
        x[1 * ldx + k / 2] = nan;
        x[6 * ldx + (k - 1)] = (k % 2) ? inf : -inf;
        if (k > 3) x[6 * ldx + 1] = nan;
        // Stride gaps (64 spare bytes per row, 2 spare sums) must stay untouched.
        Acts a = alloc_acts(s, rows, k, 64, 2), b = alloc_acts(s, rows, k, 64, 2);
        kernels_for(scalar, s).prepare_acts(x.data(), rows, k, ldx, a.buf);
        kernels_for(v.table, s).prepare_acts(x.data(), rows, k, ldx, b.buf);
        const long d = first_diff(a.data, b.data);
        ASSERT_EQ(d, -1) << "data byte (row " << d / long(a.buf.row_bytes) << "): " << int(a.data[size_t(d)]) << " vs "
                         << int(b.data[size_t(d)]);
        ASSERT_EQ(first_diff(a.scale, b.scale), -1) << "scale";
        ASSERT_EQ(first_diff(a.sums, b.sums), -1) << "group sums";
      }
}

// Gate values across the whole range of exp (including its overflow and
// underflow): INT8 rows with a single non-zero weight each, one token.
TEST(KernelsAvx2, ActivationOverExtremeGates) {
  SKIP_WITHOUT_AVX2();
  const QuantScheme s = QuantScheme::kInt8PerChannel;
  const size_t rows = 64, cols = 64;
  std::vector<float> wg(rows * cols, 0.0f), wu(rows * cols, 0.0f);
  for (size_t n = 0; n < rows; ++n) {
    wg[n * cols] = -120.0f + 240.0f * float(n) / float(rows - 1);
    wu[n * cols] = 1.0f + 0.25f * float(n % 5);
  }
  PackedGeometry g;
  ASSERT_TRUE(packed_geometry(s, rows, cols, 0, &g));
  std::vector<uint8_t> pg(g.total_bytes), pu(g.total_bytes);
  pack_matrix(s, g, wg.data(), DType::kF32, cols, pg.data());
  pack_matrix(s, g, wu.data(), DType::kF32, cols, pu.data());
  const PackedMatrixView vg = make_packed_view(s, g, pg.data()), vu = make_packed_view(s, g, pu.data());
  std::vector<float> x(cols, 0.0f);
  x[0] = 1.0f;
  Acts qa = alloc_acts(s, 1, cols);
  kernels_for(backend_kernels("scalar"), s).prepare_acts(x.data(), 1, cols, cols, qa.buf);
  ActsView a;
  a.data = qa.buf.data;
  a.row_bytes = qa.buf.row_bytes;
  a.row_scale = qa.buf.row_scale;
  a.rows = 1;
  for (float limit : {0.0f, 7.0f, 1000.0f}) {
    ActivationParams act;
    act.swiglu_limit = limit;
    act.swiglu_alpha = 1.702f;
    std::vector<float> h_ref(rows), h(rows);
    kernels_for(backend_kernels("scalar"), s).gate_up(vg, vu, 0, rows / kRowBlock, a, act, h_ref.data(), rows);
    for (const Variant& v : avx2_variants()) {
      kernels_for(v.table, s).gate_up(vg, vu, 0, rows / kRowBlock, a, act, h.data(), rows);
      for (size_t n = 0; n < rows; ++n)
        ASSERT_NEAR(h[n], h_ref[n], kIntGateUpRelTol * std::fabs(h_ref[n]) + kTinyAbs)
            << v.name << " limit=" << limit << " n=" << n;
    }
  }
}

TEST(KernelsAvx2, EmptyRangesWriteNothing) {
  SKIP_WITHOUT_AVX2();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const FormatCase& f : kFormats) {
    const Packed w = pack(f.scheme, 33, f.cols[0], f.group, 7);
    std::vector<float> x = normal_floats(2 * f.cols[0], 8);
    Acts q = alloc_acts(f.scheme, 2, f.cols[0]);
    for (const Variant& v : avx2_variants()) {
      const FormatKernels& k = kernels_for(v.table, f.scheme);
      k.prepare_acts(x.data(), 2, f.cols[0], f.cols[0], q.buf);
      ActsView a;
      a.data = q.buf.data;
      a.row_bytes = q.buf.row_bytes;
      a.row_scale = q.buf.row_scale;
      a.group_sums = q.buf.group_sums;
      a.group_sums_stride = q.buf.group_sums_stride;
      std::vector<float> h(2 * 33, nan), y(2 * 33, nan);
      float* out[2] = {y.data(), y.data() + 33};
      const float rw[2] = {1.0f, 1.0f};
      a.rows = 0;  // no tokens
      k.gate_up(w.view, w.view, 0, 3, a, ActivationParams(), h.data(), 33);
      k.down(w.view, 0, 3, a, rw, out);
      a.rows = 2;  // no blocks
      k.gate_up(w.view, w.view, 2, 2, a, ActivationParams(), h.data(), 33);
      k.down(w.view, 1, 1, a, rw, out);
      for (size_t i = 0; i < h.size(); ++i) {
        ASSERT_TRUE(same_bits(h[i], nan)) << f.name << " " << v.name;
        ASSERT_TRUE(same_bits(y[i], nan)) << f.name << " " << v.name;
      }
    }
  }
}

TEST(KernelsAvx2, CoveredPaths) {
  SKIP_WITHOUT_AVX2();
  std::string names;
  for (const Variant& v : avx2_variants()) names += (names.empty() ? "" : ", ") + v.name;
  std::cout << "[ covered  ] avx2 variants: " << names << "\n";
  // Grouped INT8 and FP8 have no AVX2 kernel yet: they borrow the scalar ones.
  for (int s = 0; s < kNumSchemes; ++s) {
    const bool borrowed = QuantScheme(s) == QuantScheme::kInt8Group || QuantScheme(s) == QuantScheme::kFP8Block;
    EXPECT_EQ(format_provider("avx2", QuantScheme(s)), borrowed ? "scalar" : "avx2") << s;
  }
}

}  // namespace
}  // namespace kt
