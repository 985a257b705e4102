// NaN and Inf through the kernel table of every backend (issue 23; policy in
// docs/DESIGN_NOTES.md, "Non-finite values"):
//   * prepare_acts gives a row holding Inf or NaN the scale NaN and the codes
//     of inv = 0, bit-identical to the scalar twin (the same memcmp contract
//     as the finite rows), and leaves the other rows of the call unchanged;
//   * a gate/up -> encode -> down chain over packed weights makes such a
//     token's whole output NaN (non-finite for BF16 and FP8 with Inf: their
//     bf16 activations carry the Inf itself), in both
//     activation modes, with routing weight 0, and every other token
//     bit-identical to a run where the token is finite;
//   * a non-finite weight gives its row or group a NaN scale at packing.
// Parameterised over the backends; skipped (not failed) where the CPU lacks
// one, so the AVX-512 and AMX encoders and kernels run where they exist.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/kernel_table.h"
#include "kt_kernel/pack.h"
#include "test_support.h"

namespace kt {
namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

const KernelTable* table_or_null(const std::string& name) {
  try {
    return &backend_kernels(name);
  } catch (const std::invalid_argument&) {
    return nullptr;
  }
}

class NonFinite : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    kt_ = table_or_null(GetParam());
    if (!kt_) GTEST_SKIP() << GetParam() << " backend unavailable: " << backend_unavailable_reason(GetParam());
    ASSERT_EQ(std::string(kt_->name), GetParam());
  }
  const KernelTable* kt_ = nullptr;
};

// One prepare_acts output, with its buffers.
struct Encoded {
  AlignedBuffer data;
  std::vector<float> scale;
  std::vector<int32_t> sums;
  ActsBuffer buf;
  size_t rows = 0;

  Encoded(QuantScheme s, size_t r, size_t k) : data(r * acts_row_bytes(s, k)), scale(r, -1.0f), rows(r) {
    std::memset(data.data(), 0xA5, data.size());
    buf.data = data.data();
    buf.row_bytes = acts_row_bytes(s, k);
    buf.row_scale = scale.data();
    buf.group_sums_stride = acts_group_sums_per_row(s, k);
    sums.assign(r * buf.group_sums_stride + 1, 12345);
    buf.group_sums = sums.data();
  }
  ActsView view() const {
    ActsView v;
    v.data = buf.data;
    v.row_bytes = buf.row_bytes;
    v.row_scale = buf.row_scale;
    v.group_sums = buf.group_sums_stride ? buf.group_sums : nullptr;
    v.group_sums_stride = buf.group_sums_stride;
    v.rows = rows;
    return v;
  }
};

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

const QuantScheme kIntSchemes[] = {QuantScheme::kInt8PerChannel, QuantScheme::kInt8Group, QuantScheme::kInt4Sym,
                                   QuantScheme::kInt4Asym};

TEST_P(NonFinite, EncoderGivesNonFiniteRowsNanScaleAndMatchesScalar) {
  const KernelTable& ref = backend_kernels("scalar");
  for (const size_t k : {size_t(64), size_t(100), size_t(200), size_t(1000)}) {
    // Rows: finite ones between bad ones; bad values in the first column,
    // the last, the 64-wide main loops and the 16/8-wide tails.
    const size_t rows = 12;
    std::vector<float> x = test::normal_floats(rows * k, uint32_t(k));
    const size_t bad_rows[] = {1, 2, 3, 5, 6, 8, 10};
    x[1 * k + 0] = kNaN;
    x[2 * k + k - 1] = kInf;
    x[3 * k + k / 2] = -kInf;
    for (size_t i = 0; i < k; ++i) x[5 * k + i] = kNaN;
    x[6 * k + 7] = kNaN;
    x[6 * k + 8] = kInf;
    for (size_t i = 0; i < k; ++i) x[8 * k + i] = 0.0f;
    x[8 * k + k - 3] = -kNaN;  // a negative NaN in an otherwise zero row
    x[10 * k + 40] = kInf;
    x[10 * k + 41] = kNaN;
    x[11 * k + 3] = 3.0e38f;  // finite near FLT_MAX: an ordinary row
    for (const QuantScheme s : kIntSchemes) {
      Encoded got(s, rows, k), want(s, rows, k);
      kernels_for(*kt_, s).prepare_acts(x.data(), rows, k, k, got.buf);
      kernels_for(ref, s).prepare_acts(x.data(), rows, k, k, want.buf);
      SCOPED_TRACE("scheme " + std::to_string(int(s)) + " k " + std::to_string(k));
      EXPECT_EQ(std::memcmp(got.data.data(), want.data.data(), got.data.size()), 0) << "codes differ from scalar";
      EXPECT_EQ(got.sums, want.sums);
      EXPECT_TRUE(same_bits(got.scale.data(), want.scale.data(), rows)) << "scales differ from scalar";
      std::vector<bool> bad(rows, false);
      for (size_t r : bad_rows) bad[r] = true;
      for (size_t r = 0; r < rows; ++r) {
        if (bad[r]) {
          EXPECT_TRUE(std::isnan(got.scale[r])) << "row " << r << " scale " << got.scale[r];
          // Codes of inv = 0: finite -> 0, Inf / NaN -> 127.
          for (size_t i = 0; i < k; ++i) {
            const int q = scheme_is_int4(s) ? int(int8_t(got.data.data()[r * got.buf.row_bytes + i]))
                                            : int(got.data.data()[r * got.buf.row_bytes + i]) - 128;
            ASSERT_EQ(q, std::isfinite(x[r * k + i]) ? 0 : 127) << "row " << r << " col " << i;
          }
          continue;
        }
        EXPECT_TRUE(std::isfinite(got.scale[r])) << "row " << r;
        Encoded alone(s, 1, k);
        kernels_for(*kt_, s).prepare_acts(x.data() + r * k, 1, k, k, alone.buf);
        EXPECT_EQ(std::memcmp(alone.data.data(), got.data.data() + r * got.buf.row_bytes, got.buf.row_bytes), 0);
        EXPECT_TRUE(same_bits(&alone.scale[0], &got.scale[r], 1));
      }
    }
  }
}

struct Format {
  const char* name;
  QuantScheme scheme;
  uint32_t group;
};

const Format kFormats[] = {
    {"bf16", QuantScheme::kBF16, 0},          {"int8", QuantScheme::kInt8PerChannel, 0},
    {"int8_g32", QuantScheme::kInt8Group, 32}, {"int4_g32", QuantScheme::kInt4Sym, 32},
    {"int4_pc", QuantScheme::kInt4Sym, 0},     {"int4m_g64", QuantScheme::kInt4Asym, 64},
    {"fp8_g128", QuantScheme::kFP8Block, 128},
};

struct Packed {
  PackedGeometry geo;
  AlignedBuffer buf;
  PackedMatrixView view;
  Packed(const Format& f, uint32_t rows, uint32_t cols, const std::vector<float>& w) {
    EXPECT_TRUE(packed_geometry(f.scheme, rows, cols, f.group, &geo));
    buf = AlignedBuffer(geo.total_bytes);
    pack_matrix(f.scheme, geo, w.data(), DType::kF32, cols, buf.data());
    view = make_packed_view(f.scheme, geo, buf.data());
  }
};

// y [T][H] = down(act(gate x, up x)) per token, weighted, through the table.
std::vector<float> chain(const KernelTable& kt, const Format& f, const Packed& gate, const Packed& up,
                         const Packed& down, const std::vector<float>& x, size_t T, size_t H, size_t I,
                         const ActivationParams& act, const std::vector<float>& row_weight) {
  const FormatKernels& fk = kernels_for(kt, f.scheme);
  Encoded qx(f.scheme, T, H);
  fk.prepare_acts(x.data(), T, H, H, qx.buf);
  std::vector<float> h(T * I, kNaN);
  fk.gate_up(gate.view, up.view, 0, gate.geo.rows_padded / kRowBlock, qx.view(), act, h.data(), I);
  Encoded qh(f.scheme, T, I);
  fk.prepare_acts(h.data(), T, I, I, qh.buf);
  std::vector<float> y(T * H, 0.0f);
  std::vector<float*> out(T);
  for (size_t t = 0; t < T; ++t) out[t] = y.data() + t * H;
  fk.down(down.view, 0, down.geo.rows_padded / kRowBlock, qh.view(), row_weight.data(), out.data());
  return y;
}

TEST_P(NonFinite, BadTokenGivesNanAndLeavesOthersBitIdentical) {
  const size_t H = 128, I = 128;
  for (const Format& f : kFormats) {
    const std::vector<float> wg = test::normal_floats(I * H, 1, 0.09f), wu = test::normal_floats(I * H, 2, 0.09f),
                             wd = test::normal_floats(H * I, 3, 0.09f);
    const Packed gate(f, I, H, wg), up(f, I, H, wu), down(f, H, I, wd);
    for (const size_t T : {size_t(1), size_t(5), size_t(17)}) {
      const size_t bad_t = T / 2;
      const std::vector<float> x = test::normal_floats(T * H, 4);
      std::vector<float> rw(T, 0.75f);
      rw[bad_t] = 0.0f;  // weight 0 still multiplies: 0 * NaN = NaN
      for (const float limit : {0.0f, 0.5f}) {
        const ActivationParams act{limit, limit > 0.0f ? 1.702f : 0.0f};
        const std::vector<float> clean = chain(*kt_, f, gate, up, down, x, T, H, I, act, rw);
        for (const float bad : {kNaN, kInf, -kInf}) {
          SCOPED_TRACE(std::string(f.name) + " T " + std::to_string(T) + " limit " + std::to_string(limit) +
                       " bad " + std::to_string(bad));
          std::vector<float> xb = x;
          xb[bad_t * H + 17] = bad;
          const std::vector<float> y = chain(*kt_, f, gate, up, down, xb, T, H, I, act, rw);
          for (size_t t = 0; t < T; ++t) {
            if (t != bad_t) {
              EXPECT_TRUE(same_bits(&y[t * H], &clean[t * H], H)) << "token " << t << " changed";
              continue;
            }
            for (size_t c = 0; c < H; ++c) {
              if (scheme_bf16_acts(f.scheme) && !std::isnan(bad))  // IEEE arithmetic on the Inf
                ASSERT_FALSE(std::isfinite(y[t * H + c])) << "column " << c;
              else
                ASSERT_TRUE(std::isnan(y[t * H + c])) << "column " << c << " = " << y[t * H + c];
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, NonFinite, ::testing::Values("scalar", "avx2", "avx512", "amx", "amx-emu"),
                         [](const ::testing::TestParamInfo<const char*>& i) {
                           std::string n = i.param;
                           for (char& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

// Packing (baseline code, one implementation): a non-finite weight NaNs the
// scale of its row (per channel) or group, and nothing else.
TEST(NonFinitePack, NonFiniteWeightGivesItsRowOrGroupNanScale) {
  const uint32_t rows = 20, cols = 256;
  const std::vector<float> w = test::normal_floats(size_t(rows) * cols, 9);
  for (const Format& f : kFormats) {
    if (f.scheme == QuantScheme::kBF16) continue;
    for (const uint32_t group : {f.group, uint32_t(0)}) {
      if (group == 0 && scheme_has_groups(f.scheme) && f.scheme != QuantScheme::kInt4Sym &&
          f.scheme != QuantScheme::kInt4Asym)
        continue;  // grouped INT8 and FP8 have no per-channel form
      PackedGeometry geo;
      ASSERT_TRUE(packed_geometry(f.scheme, rows, cols, group, &geo));
      for (const float bad : {kNaN, kInf, -kInf}) {
        SCOPED_TRACE(std::string(f.name) + " group " + std::to_string(group) + " bad " + std::to_string(bad));
        std::vector<float> wb = w;
        wb[7 * cols + 100] = bad;
        AlignedBuffer p0(geo.total_bytes), p1(geo.total_bytes);
        pack_matrix(f.scheme, geo, w.data(), DType::kF32, cols, p0.data());
        pack_matrix(f.scheme, geo, wb.data(), DType::kF32, cols, p1.data());
        std::vector<double> u0(size_t(rows) * cols), u1(size_t(rows) * cols);
        unpack_matrix(f.scheme, geo, p0.data(), u0.data());
        unpack_matrix(f.scheme, geo, p1.data(), u1.data());
        const uint32_t gs = group ? group : cols;
        for (uint32_t r = 0; r < rows; ++r)
          for (uint32_t c = 0; c < cols; ++c) {
            const size_t i = size_t(r) * cols + c;
            if (r == 7 && c / gs == 100 / gs)
              ASSERT_TRUE(std::isnan(u1[i])) << r << ", " << c;
            else
              ASSERT_EQ(u1[i], u0[i]) << r << ", " << c;
          }
      }
    }
  }
}

}  // namespace
}  // namespace kt
