// The avx512 backend against the scalar reference twins, format by format,
// over hostile sizes: row counts around the 16-row block (1-10, 15-17,
// 31-33, 64+), K with and without padding to 64 and with every INT4 group
// size, token counts on both sides of the GEMV/GEMM switch, activation rows
// gathered through row_index, views starting at a column offset (NUMA
// slices of K), partial block ranges, and outputs poisoned with NaN so that
// a write outside the range, or a missed one, shows.
//
// Tolerances, per format: prepare_acts and the integer down kernels are
// bit-exact (memcmp); integer gate/up differs only through exp in the
// activation (kGateUpRelTol per element); BF16 accumulates in fp32 where the
// reference uses double (kBf16Tol relative to the largest |output|).
// Skipped (not failed) where the CPU lacks AVX-512.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <iterator>
#include <ostream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "kt_kernel/cpu_features.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/kernel_table.h"
#include "kt_kernel/pack.h"
#include "test_support.h"

namespace kt {
namespace {

using test::normal_floats;

constexpr float kGateUpRelTol = 1e-6f;
constexpr double kBf16Tol = 1e-5;

const KernelTable* avx512_or_null() {
  try {
    return &backend_kernels("avx512");
  } catch (const std::invalid_argument&) {
    return nullptr;
  }
}

#define REQUIRE_AVX512(var)                                                                          \
  const KernelTable* var = avx512_or_null();                                                         \
  if (!var) GTEST_SKIP() << "avx512 backend unavailable: " << backend_unavailable_reason("avx512")

struct Format {
  const char* name;
  QuantScheme scheme;
  uint32_t group;
  bool raw_codes = false;  // FP8: uniformly random e4m3 codes (all but NaN, subnormals included) and scales
};

const Format kFormats[] = {
    {"bf16", QuantScheme::kBF16, 0},         {"int8", QuantScheme::kInt8PerChannel, 0},
    {"int4_pc", QuantScheme::kInt4Sym, 0},   {"int4_g32", QuantScheme::kInt4Sym, 32},
    {"int4_g64", QuantScheme::kInt4Sym, 64}, {"int4_g128", QuantScheme::kInt4Sym, 128},
    {"int4m_g32", QuantScheme::kInt4Asym, 32}, {"int4m_pc", QuantScheme::kInt4Asym, 0},
    {"int4m_g128", QuantScheme::kInt4Asym, 128},
    {"int8_g32", QuantScheme::kInt8Group, 32}, {"int8_g64", QuantScheme::kInt8Group, 64},
    {"int8_g128", QuantScheme::kInt8Group, 128},
    {"fp8_g128", QuantScheme::kFP8Block, 128}, {"fp8_g32", QuantScheme::kFP8Block, 32},
    {"fp8_codes_g128", QuantScheme::kFP8Block, 128, true},
};

void PrintTo(const Format& f, std::ostream* os) { *os << f.name; }

bool is_integer(QuantScheme s) { return s != QuantScheme::kBF16 && s != QuantScheme::kFP8Block; }

const uint32_t kRows[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33, 64, 100};
const uint32_t kCols[] = {64, 96, 128, 192, 320, 100};
const size_t kTokens[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 31, 32, 33, 64};

struct Packed {
  PackedGeometry geo;
  AlignedBuffer buf;
  PackedMatrixView view;
};

bool make_packed(const Format& f, uint32_t rows, uint32_t cols, std::mt19937& rng, Packed* p) {
  if (!packed_geometry(f.scheme, rows, cols, f.group, &p->geo)) return false;
  // Asymmetric formats get a per-row offset so that mins matter.
  const float mean = f.scheme == QuantScheme::kInt4Asym ? 0.7f : 0.0f;
  std::vector<float> w = normal_floats(rng, size_t(rows) * cols, 1.0f, mean);
  p->buf = AlignedBuffer(p->geo.total_bytes);
  if (f.raw_codes) {
    std::vector<uint8_t> q(size_t(rows) * cols);
    for (auto& c : q) {
      c = uint8_t(rng());
      if ((c & 0x7f) == 0x7f) c = uint8_t(c ^ 0x01);  // no NaN codes
    }
    std::uniform_real_distribution<float> sd(1e-3f, 1e-2f);
    std::vector<float> sc(size_t(rows) * (cols / f.group));
    for (auto& v : sc) v = sd(rng);
    pack_quantized_blocks(f.scheme, p->geo, q.data(), cols, sc.data(), nullptr, cols / f.group, p->buf.data(), 0,
                          p->geo.rows_padded / kRowBlock);
  } else {
    pack_matrix(f.scheme, p->geo, w.data(), DType::kF32, cols, p->buf.data());
  }
  p->view = make_packed_view(f.scheme, p->geo, p->buf.data());
  return true;
}

// Encoded activation rows (by the reference encoder), full width `k`.
struct Acts {
  size_t rows = 0, k = 0;
  std::vector<uint8_t> data;
  std::vector<float> scale;
  std::vector<int32_t> sums;
  ActsBuffer buffer;

  void init(QuantScheme s, size_t r, size_t kk) {
    rows = r;
    k = kk;
    buffer.row_bytes = acts_row_bytes(s, k);
    buffer.group_sums_stride = acts_group_sums_per_row(s, k);
    data.assign(rows * buffer.row_bytes, 0xA5);
    scale.assign(rows, -1.0f);
    sums.assign(rows * buffer.group_sums_stride + 1, 12345);
    buffer.data = data.data();
    buffer.row_scale = scale.data();
    buffer.group_sums = sums.data();
  }

  ActsView view(QuantScheme s, size_t col0, const int32_t* row_index, size_t n) const {
    ActsView v;
    v.data = data.data() + col0 * (scheme_bf16_acts(s) ? 2 : 1);
    v.row_bytes = buffer.row_bytes;
    v.row_scale = scale.data();
    v.group_sums = buffer.group_sums_stride ? sums.data() + col0 / kActSumGroup : nullptr;
    v.group_sums_stride = buffer.group_sums_stride;
    v.row_index = row_index;
    v.rows = n;
    return v;
  }
};

TEST(KernelsAvx512, RegistersEveryFormat) {
  REQUIRE_AVX512(avx);
  EXPECT_STREQ(avx->name, "avx512");
  for (const QuantScheme s :
       {QuantScheme::kInt8PerChannel, QuantScheme::kInt4Sym, QuantScheme::kInt4Asym, QuantScheme::kInt8Group})
    EXPECT_EQ(format_provider("avx512", s), "avx512") << int(s);
  EXPECT_EQ(format_provider("avx512", QuantScheme::kBF16) == "avx512", cpu_features().avx512_bf16);
  EXPECT_EQ(format_provider("avx512", QuantScheme::kFP8Block) == "avx512", cpu_features().avx512_bf16);
  for (const auto& f : avx->formats) {
    EXPECT_NE(f.prepare_acts, nullptr);
    EXPECT_NE(f.gate_up, nullptr);
    EXPECT_NE(f.down, nullptr);
  }
}

// prepare_acts: bit-exact, including zero rows, NaN/inf, subnormals, ties.
TEST(KernelsAvx512, PrepareActsBitExact) {
  REQUIRE_AVX512(avx);
  const KernelTable& ref = backend_kernels("scalar");
  std::mt19937 rng(7);
  for (const QuantScheme s :
       {QuantScheme::kBF16, QuantScheme::kInt8PerChannel, QuantScheme::kInt4Sym, QuantScheme::kInt4Asym,
        QuantScheme::kInt8Group, QuantScheme::kFP8Block}) {
    if (format_provider("avx512", s) != "avx512") continue;
    for (size_t k : {1, 5, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 320, 1000, 2048}) {
      const size_t rows = 9, ldx = k + 3;
      std::vector<float> x = normal_floats(rng, rows * ldx);
      for (size_t i = 0; i < k; ++i) {
        x[1 * ldx + i] = 0.0f;                                           // all-zero row
        x[2 * ldx + i] = float(int(i % 7) - 3) * 0.5f;                   // exact ties of x * 127 / amax
        x[3 * ldx + i] = std::ldexp(x[3 * ldx + i], -130);               // subnormals
        x[4 * ldx + i] = (i % 2 ? -1.0f : 1.0f) * std::ldexp(1.0f, -20);  // equal magnitudes
      }
      x[5 * ldx + k / 2] = std::numeric_limits<float>::quiet_NaN();
      x[6 * ldx + k - 1] = std::numeric_limits<float>::infinity();
      x[7 * ldx + 0] = -0.0f;
      x[8 * ldx + k - 1] = 1e30f;
      Acts a, b;
      a.init(s, rows, k);
      b.init(s, rows, k);
      kernels_for(ref, s).prepare_acts(x.data(), rows, k, ldx, a.buffer);
      kernels_for(*avx, s).prepare_acts(x.data(), rows, k, ldx, b.buffer);
      SCOPED_TRACE("scheme " + std::to_string(int(s)) + " k " + std::to_string(k));
      for (size_t i = 0; i < a.data.size(); ++i)
        if (a.data[i] != b.data[i]) {
          ADD_FAILURE() << "data row " << i / a.buffer.row_bytes << " byte " << i % a.buffer.row_bytes << ": "
                        << int(b.data[i]) << ", reference " << int(a.data[i]);
          break;
        }
      if (s != QuantScheme::kBF16) {
        for (size_t r = 0; r < rows; ++r)
          EXPECT_EQ(0, std::memcmp(&a.scale[r], &b.scale[r], sizeof(float)))
              << "scale of row " << r << ": " << b.scale[r] << ", reference " << a.scale[r];
      }
      for (size_t i = 0; i < a.sums.size(); ++i)
        if (a.sums[i] != b.sums[i]) {
          ADD_FAILURE() << "sum " << i << ": " << b.sums[i] << ", reference " << a.sums[i];
          break;
        }
    }
  }
}

class KernelsAvx512Format : public ::testing::TestWithParam<Format> {};

struct Case {
  uint32_t rows, cols;
  size_t tokens;
  size_t col0;        // column offset of the activation view
  bool gather;        // activation rows through row_index
  size_t bb, be;      // block range
  ActivationParams act;
  float x_scale = 1.0f;  // > 1 drives the activation's exp to its range ends
};

// Runs one case for both backends and compares; returns false after a failure.
bool run_case(const Format& f, const KernelTable& avx, const KernelTable& ref, const Case& c, std::mt19937& rng) {
  Packed gate, up, down;
  if (!make_packed(f, c.rows, c.cols, rng, &gate)) return true;
  make_packed(f, c.rows, c.cols, rng, &up);
  make_packed(f, c.rows, c.cols, rng, &down);
  const std::string where = std::string(f.name) + " rows " + std::to_string(c.rows) + " cols " +
                            std::to_string(c.cols) + " tokens " + std::to_string(c.tokens) + " col0 " +
                            std::to_string(c.col0) +
                            (c.gather ? " gather" : "") + " blocks [" + std::to_string(c.bb) + "," +
                            std::to_string(c.be) + ") " + (c.act.swiglu_limit > 0 ? "swigluoai" : "silu") +
                            " x*" + std::to_string(c.x_scale);
  SCOPED_TRACE(where);

  // Activation source rows: more than the tokens when gathering; a view at
  // column col0 of rows of col0 + cols (+ a spare 64) columns.
  const size_t src_rows = c.gather ? c.tokens * 2 + 3 : c.tokens;
  const size_t kfull = c.col0 + c.cols + (c.col0 ? 64 : 0);
  std::vector<float> x = normal_floats(rng, src_rows * kfull);
  // (BF16 is compared relative to max |h|, which the swigluoai clamps bound
  // while scaled inputs grow the dot products and their fp32 rounding: the
  // scaled cases exercise exp's range on the bit-exact integer formats.)
  const float x_scale = is_integer(f.scheme) ? c.x_scale : 1.0f;
  for (auto& v : x) v *= x_scale;
  Acts acts;
  acts.init(f.scheme, src_rows, kfull);
  kernels_for(ref, f.scheme).prepare_acts(x.data(), src_rows, kfull, kfull, acts.buffer);
  std::vector<int32_t> index(c.tokens);
  for (size_t m = 0; m < c.tokens; ++m) index[m] = int32_t(rng() % src_rows);
  const ActsView a = acts.view(f.scheme, c.col0, c.gather ? index.data() : nullptr, c.tokens);

  const size_t n_begin = c.bb * kRowBlock, n_end = std::min<size_t>(c.be * kRowBlock, c.rows);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  bool ok = true;

  // gate/up into NaN-poisoned h with a row stride wider than the rows.
  const size_t ldh = c.rows + 5;
  std::vector<float> h_ref(c.tokens * ldh, nan), h_avx(c.tokens * ldh, nan);
  kernels_for(ref, f.scheme).gate_up(gate.view, up.view, c.bb, c.be, a, c.act, h_ref.data(), ldh);
  kernels_for(avx, f.scheme).gate_up(gate.view, up.view, c.bb, c.be, a, c.act, h_avx.data(), ldh);
  double hmax = 0.0;
  for (size_t i = 0; i < h_ref.size(); ++i)
    if (std::isfinite(h_ref[i])) hmax = std::max(hmax, double(std::fabs(h_ref[i])));
  for (size_t m = 0; m < c.tokens && ok; ++m)
    for (size_t n = 0; n < ldh && ok; ++n) {
      const float r = h_ref[m * ldh + n], v = h_avx[m * ldh + n];
      if (n < n_begin || n >= n_end) {
        if (!std::isnan(v)) {
          ADD_FAILURE() << "gate_up wrote h[" << m << "][" << n << "] outside the block range";
          ok = false;
        }
        continue;
      }
      const double tol = is_integer(f.scheme) ? kGateUpRelTol * std::fabs(double(r)) + 1e-30 : kBf16Tol * hmax;
      if (!std::isfinite(v) || std::fabs(double(v) - double(r)) > tol) {
        ADD_FAILURE() << "gate_up h[" << m << "][" << n << "] = " << v << ", reference " << r;
        ok = false;
      }
    }

  // down: each token's output row at its own place, in-range columns preset
  // to finite values (the kernel accumulates), the rest NaN.
  const size_t ldo = c.rows + 7;
  std::vector<float> o_ref(c.tokens * ldo, nan);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (size_t m = 0; m < c.tokens; ++m)
    for (size_t n = n_begin; n < n_end; ++n) o_ref[m * ldo + n] = u(rng);
  std::vector<float> o_avx = o_ref, o_hint = o_ref;
  std::vector<float> weight(c.tokens);
  for (auto& w : weight) w = u(rng);
  std::vector<float*> rows_ref(c.tokens), rows_avx(c.tokens), rows_hint(c.tokens);
  for (size_t m = 0; m < c.tokens; ++m) {
    const size_t slot = c.tokens - 1 - m;  // out_rows need not follow memory order
    rows_ref[m] = o_ref.data() + slot * ldo;
    rows_avx[m] = o_avx.data() + slot * ldo;
    rows_hint[m] = o_hint.data() + slot * ldo;
  }
  kernels_for(ref, f.scheme).down(down.view, c.bb, c.be, a, weight.data(), rows_ref.data());
  kernels_for(avx, f.scheme).down(down.view, c.bb, c.be, a, weight.data(), rows_avx.data());
  // The next-matrix prefetch hint (another matrix of the same geometry)
  // changes nothing.
  PackedMatrixView hinted = down.view;
  hinted.next_weights = up.view.weights;
  kernels_for(avx, f.scheme).down(hinted, c.bb, c.be, a, weight.data(), rows_hint.data());
  if (std::memcmp(o_avx.data(), o_hint.data(), o_avx.size() * sizeof(float)) != 0) {
    ADD_FAILURE() << "down with next_weights set differs from down without";
    ok = false;
  }
  if (is_integer(f.scheme)) {
    if (std::memcmp(o_ref.data(), o_avx.data(), o_ref.size() * sizeof(float)) != 0) {
      for (size_t i = 0; i < o_ref.size(); ++i)
        if (std::memcmp(&o_ref[i], &o_avx[i], 4) != 0) {
          ADD_FAILURE() << "down out[" << i / ldo << "][" << i % ldo << "] = " << o_avx[i] << ", reference "
                        << o_ref[i] << " (must be bit-identical)";
          break;
        }
      ok = false;
    }
  } else {
    double omax = 0.0;
    for (float v : o_ref)
      if (std::isfinite(v)) omax = std::max(omax, double(std::fabs(v)));
    for (size_t i = 0; i < o_ref.size() && ok; ++i) {
      const size_t n = i % ldo;
      const bool in = n >= n_begin && n < n_end;
      const bool bad = !in ? !std::isnan(o_avx[i])
                           : (!std::isfinite(o_avx[i]) || std::fabs(double(o_avx[i]) - o_ref[i]) > kBf16Tol * omax);
      if (bad) {
        ADD_FAILURE() << "down out[" << i / ldo << "][" << n << "] = " << o_avx[i] << ", reference " << o_ref[i];
        ok = false;
      }
    }
  }
  return ok;
}

TEST_P(KernelsAvx512Format, MatchesScalarReference) {
  REQUIRE_AVX512(avx);
  const Format& f = GetParam();
  if (format_provider("avx512", f.scheme) != "avx512") GTEST_SKIP() << "format borrowed from another backend here";
  const KernelTable& ref = backend_kernels("scalar");
  std::mt19937 rng(1234 + unsigned(f.scheme) * 7 + f.group);
  size_t count = 0, ran = 0;
  const size_t ntok = sizeof(kTokens) / sizeof(kTokens[0]);
  std::vector<uint32_t> cols_list(std::begin(kCols), std::end(kCols));
  if (f.scheme == QuantScheme::kFP8Block) cols_list.insert(cols_list.end(), {256u, 384u});
  for (uint32_t cols : cols_list) {
    for (uint32_t rows : kRows) {
      PackedGeometry g;
      if (!packed_geometry(f.scheme, rows, cols, f.group, &g)) continue;
      const size_t blocks = g.rows_padded / kRowBlock;
      for (int rep = 0; rep < 3; ++rep) {
        Case c;
        c.rows = rows;
        c.cols = cols;
        c.tokens = kTokens[(count * 5 + size_t(rep) * 6 + rows) % ntok];
        c.gather = (count + size_t(rep)) % 2 == 1;
        c.col0 = (count % 3 == 2) ? (count % 2 ? 64 : 128) : 0;
        if (f.group == 128 && c.col0 == 64) c.col0 = 128;
        // The full range, a strict sub-range, or a range ending at the last (partial) block.
        c.bb = (rep >= 1 && blocks > 1) ? 1 : 0;
        c.be = (rep == 1 && blocks > 2) ? blocks - 1 : blocks;
        c.act = (count % 2) ? ActivationParams{7.0f, 1.702f} : ActivationParams{};
        c.x_scale = (count % 7 == 3) ? 40.0f : 1.0f;
        ++count;
        ++ran;
        if (!run_case(f, *avx, ref, c, rng)) return;
      }
    }
  }
  // Every token count on both sides of the GEMV/GEMM switch, with a K
  // long enough for many groups, and block ranges that start and end
  // anywhere (tiles of several blocks with a remainder).
  for (size_t i = 0; i < ntok; ++i) {
    Case c;
    c.rows = 16 * 11 - 3;
    c.cols = 1024;
    c.tokens = kTokens[i];
    c.gather = i % 2 == 0;
    c.col0 = i % 3 == 0 ? 128 : 0;
    c.bb = i % 4;
    c.be = 11 - (i % 3);
    c.act = (i % 2) ? ActivationParams{7.0f, 1.702f} : ActivationParams{};
    c.x_scale = i % 5 == 4 ? 40.0f : 1.0f;
    ++ran;
    if (!run_case(f, *avx, ref, c, rng)) return;
  }
  EXPECT_GT(ran, 40u);
}

// No activation rows, or an empty block range: nothing is written.
TEST_P(KernelsAvx512Format, EmptyCallsWriteNothing) {
  REQUIRE_AVX512(avx);
  const Format& f = GetParam();
  if (format_provider("avx512", f.scheme) != "avx512") GTEST_SKIP() << "format borrowed from another backend here";
  std::mt19937 rng(5);
  Packed w;
  ASSERT_TRUE(make_packed(f, 40, 128, rng, &w));
  std::vector<float> x = normal_floats(rng, 3 * 128);
  Acts acts;
  acts.init(f.scheme, 3, 128);
  kernels_for(*avx, f.scheme).prepare_acts(x.data(), 3, 128, 128, acts.buffer);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> h(3 * 40, nan), o(3 * 40, nan), rw(3, 1.0f);
  float* rows[3] = {o.data(), o.data() + 40, o.data() + 80};
  // Zero rows over the full range; three rows over an empty and a reversed range.
  const size_t calls[3][3] = {{0, 0, 3}, {3, 2, 2}, {3, 3, 2}};  // rows, block_begin, block_end
  for (const auto& c : calls) {
    const ActsView a = acts.view(f.scheme, 0, nullptr, c[0]);
    kernels_for(*avx, f.scheme).gate_up(w.view, w.view, c[1], c[2], a, ActivationParams{}, h.data(), 40);
    kernels_for(*avx, f.scheme).down(w.view, c[1], c[2], a, rw.data(), rows);
  }
  for (float v : h) EXPECT_TRUE(std::isnan(v));
  for (float v : o) EXPECT_TRUE(std::isnan(v));
}

INSTANTIATE_TEST_SUITE_P(Formats, KernelsAvx512Format, ::testing::ValuesIn(kFormats),
                         [](const ::testing::TestParamInfo<Format>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace kt
