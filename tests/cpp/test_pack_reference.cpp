// The packed-weight contract and the scalar reference kernels, checked
// against plain float64 arithmetic on unpacked weights.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kt_kernel/dispatch.h"
#include "kt_kernel/pack.h"
#include "test_support.h"

namespace kt {
namespace {

using test::normal_floats;

struct Packed {
  PackedGeometry geo;
  std::vector<uint8_t> bytes;
  PackedMatrixView view;
};

Packed pack(QuantScheme s, size_t rows, size_t cols, uint32_t group, const std::vector<float>& w) {
  Packed p;
  EXPECT_TRUE(packed_geometry(s, uint32_t(rows), uint32_t(cols), group, &p.geo));
  p.bytes.assign(p.geo.total_bytes, 0xAB);  // garbage: pack must write every byte it owns
  pack_matrix(s, p.geo, w.data(), DType::kF32, cols, p.bytes.data());
  p.view = make_packed_view(s, p.geo, p.bytes.data());
  return p;
}

TEST(PackedGeometry, SectionsAreAlignedAndSized) {
  PackedGeometry g;
  ASSERT_TRUE(packed_geometry(QuantScheme::kInt4Sym, 33, 96, 32, &g));
  EXPECT_EQ(g.rows_padded, 48u);
  EXPECT_EQ(g.cols_padded, 128u);
  EXPECT_EQ(g.groups, 4u);
  EXPECT_EQ(g.block_weight_bytes, 128u / 8 * 64);
  EXPECT_EQ(g.scales_offset % 64, 0u);
  EXPECT_EQ(g.total_bytes % 64, 0u);
  EXPECT_FALSE(packed_geometry(QuantScheme::kInt4Sym, 16, 96, 64, &g));  // 64 does not divide 96
  EXPECT_FALSE(packed_geometry(QuantScheme::kInt4Sym, 16, 64, 48, &g));  // not a multiple of 32
  EXPECT_FALSE(packed_geometry(QuantScheme::kBF16, 16, 64, 32, &g));     // BF16 has no groups
  EXPECT_FALSE(packed_geometry(QuantScheme::kInt8PerChannel, 0, 64, 0, &g));
  // Grouped INT8: scales and compensation per row and group.
  ASSERT_TRUE(packed_geometry(QuantScheme::kInt8Group, 33, 96, 32, &g));
  EXPECT_EQ(g.cols_padded, 128u);
  EXPECT_EQ(g.groups, 4u);
  EXPECT_EQ(g.per_channel, 0u);
  EXPECT_EQ(g.block_weight_bytes, 128u / 4 * 64);
  EXPECT_EQ(g.compensation_offset - g.scales_offset, 3u * 4 * 16 * 4);
  EXPECT_EQ(g.total_bytes - g.compensation_offset, 3u * 4 * 16 * 4);
  EXPECT_FALSE(packed_geometry(QuantScheme::kInt8Group, 16, 64, 0, &g));    // needs a group
  EXPECT_FALSE(packed_geometry(QuantScheme::kInt8Group, 16, 256, 256, &g)); // only 32 / 64 / 128
  EXPECT_FALSE(packed_geometry(QuantScheme::kInt8Group, 16, 96, 64, &g));   // 64 does not divide 96
  // FP8 block: 1-byte codes (4 k per step), scales per row and group, no compensation.
  ASSERT_TRUE(packed_geometry(QuantScheme::kFP8Block, 33, 384, 128, &g));
  EXPECT_EQ(g.groups, 3u);
  EXPECT_EQ(g.block_weight_bytes, 384u / 4 * 64);
  EXPECT_EQ(g.total_bytes - g.scales_offset, 3u * 3 * 16 * 4);
  EXPECT_EQ(g.compensation_offset, 0u);
  EXPECT_FALSE(packed_geometry(QuantScheme::kFP8Block, 16, 192, 128, &g));  // 128 does not divide 192
  EXPECT_FALSE(packed_geometry(QuantScheme::kFP8Block, 16, 128, 0, &g));    // needs a group
}

TEST(Pack, IsDeterministicAndWritesEveryByte) {
  const auto w = normal_floats(size_t(17) * 160, 1);
  for (QuantScheme s : {QuantScheme::kBF16, QuantScheme::kInt8PerChannel, QuantScheme::kInt4Sym, QuantScheme::kInt4Asym,
                        QuantScheme::kInt8Group, QuantScheme::kFP8Block}) {
    const bool grouped = s == QuantScheme::kInt8Group || s == QuantScheme::kFP8Block;
    const size_t C = grouped ? 160 : 100;
    Packed a = pack(s, 17, C, grouped ? 32 : 0, w);
    PackedGeometry g = a.geo;
    std::vector<uint8_t> b(g.total_bytes, 0x11);
    pack_matrix(s, g, w.data(), DType::kF32, C, b.data());
    // Section padding between arrays is never read; compare the arrays themselves.
    const size_t weights = (g.rows_padded / kRowBlock) * g.block_weight_bytes;
    EXPECT_EQ(0, std::memcmp(a.bytes.data(), b.data(), weights)) << int(s);
  }
}

TEST(Pack, SliceOfKPacksLikeTheFullMatrix) {
  // A NUMA slice of K [128, 256) of a 256-wide per-channel INT8 matrix holds the
  // same quantised values as the full matrix's columns (scales cover whole rows).
  const auto w = normal_floats(size_t(16) * 256, 2);
  Packed full = pack(QuantScheme::kInt8PerChannel, 16, 256, 0, w);
  PackedGeometry g;
  ASSERT_TRUE(packed_geometry(QuantScheme::kInt8PerChannel, 16, 128, 0, &g));
  std::vector<uint8_t> slice(g.total_bytes);
  pack_matrix(QuantScheme::kInt8PerChannel, g, w.data(), DType::kF32, 256, slice.data(), 128, 256);
  std::vector<double> a(16 * 256), b(16 * 128);
  unpack_matrix(QuantScheme::kInt8PerChannel, full.geo, full.bytes.data(), a.data());
  unpack_matrix(QuantScheme::kInt8PerChannel, g, slice.data(), b.data());
  for (size_t r = 0; r < 16; ++r)
    for (size_t c = 0; c < 128; ++c) ASSERT_EQ(a[r * 256 + 128 + c], b[r * 128 + c]);
}

// Scalar down() against float64 maths on the unpacked weights and the
// dequantised activations: the reference kernel computes what it documents.
TEST(ReferenceKernels, DownMatchesFloat64OnUnpackedValues) {
  const KernelTable& ref = backend_kernels("scalar");
  const size_t N = 33, K = 192, M = 5;
  const auto w = normal_floats(size_t(N) * K, 3);
  const auto x = normal_floats(size_t(M) * K, 4);
  for (QuantScheme s : {QuantScheme::kBF16, QuantScheme::kInt8PerChannel, QuantScheme::kInt4Sym, QuantScheme::kInt4Asym,
                        QuantScheme::kInt8Group, QuantScheme::kFP8Block}) {
    const uint32_t group = scheme_has_groups(s) ? 64 : 0;
    Packed p = pack(s, N, K, group, w);
    std::vector<double> wd(N * K);
    unpack_matrix(s, p.geo, p.bytes.data(), wd.data());
    const size_t rb = acts_row_bytes(s, K), gs = acts_group_sums_per_row(s, K);
    std::vector<uint8_t> data(M * rb);
    std::vector<float> scale(M);
    std::vector<int32_t> sums(M * gs + 1);
    ActsBuffer buf{data.data(), rb, scale.data(), sums.data(), gs};
    kernels_for(ref, s).prepare_acts(x.data(), M, K, K, buf);
    ActsView a{data.data(), rb, scale.data(), sums.data(), gs, nullptr, M};
    std::vector<float> out(M * N, 0.0f);
    std::vector<float*> rows(M);
    std::vector<float> rw(M, 1.0f);
    for (size_t m = 0; m < M; ++m) rows[m] = out.data() + m * N;
    kernels_for(ref, s).down(p.view, 0, p.geo.rows_padded / kRowBlock, a, rw.data(), rows.data());
    for (size_t m = 0; m < M; ++m) {
      // Dequantised activations.
      std::vector<double> xd(K);
      for (size_t k = 0; k < K; ++k) {
        if (scheme_bf16_acts(s)) {
          xd[k] = bf16_to_f32(reinterpret_cast<const uint16_t*>(data.data() + m * rb)[k]);
        } else {
          const int q = scheme_is_int8(s) ? int(data[m * rb + k]) - 128 : int(int8_t(data[m * rb + k]));
          xd[k] = double(q) * scale[m];
        }
      }
      for (size_t n = 0; n < N; ++n) {
        double want = 0.0, mag = 0.0;
        for (size_t k = 0; k < K; ++k) {
          want += wd[n * K + k] * xd[k];
          mag += std::fabs(wd[n * K + k] * xd[k]);
        }
        EXPECT_NEAR(out[m * N + n], want, 1e-6 * mag + 1e-9) << "scheme " << int(s) << " m " << m << " n " << n;
      }
    }
  }
}

TEST(Dispatch, KnowsEveryBackendAndExplainsUnavailableOnes) {
  const auto known = known_backends();
  ASSERT_EQ(known, (std::vector<std::string>{"amx", "avx512", "avx2", "scalar", "amx-emu"}));
  const auto avail = available_backends();
  ASSERT_FALSE(avail.empty());
  EXPECT_NE(std::find(avail.begin(), avail.end(), "scalar"), avail.end());
  for (const auto& n : known) {
    const bool ok = std::find(avail.begin(), avail.end(), n) != avail.end();
    EXPECT_EQ(ok, backend_unavailable_reason(n).empty()) << n;
    if (!ok) {
      EXPECT_THROW(backend_kernels(n), std::invalid_argument) << n;
    } else {
      const KernelTable& t = backend_kernels(n);
      for (int s = 0; s < kNumSchemes; ++s) {
        EXPECT_TRUE(t.formats[s].prepare_acts && t.formats[s].gate_up && t.formats[s].down) << n << " " << s;
        EXPECT_FALSE(format_provider(n, QuantScheme(s)).empty());
      }
    }
  }
  EXPECT_THROW(backend_kernels("nonsense"), std::invalid_argument);
}

}  // namespace
}  // namespace kt
