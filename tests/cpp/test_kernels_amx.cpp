// The AMX backend: the software tile unit against hand-computed results, and
// the AMX kernels (over emulated tiles as "amx-emu"; over real tiles as
// "amx" where the CPU has them) against the scalar reference for every
// format, over hostile sizes, gathered rows, column-offset views, partial
// block ranges and NaN-poisoned outputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kt_kernel/cpu_features.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/moe_layer.h"
#include "kt_kernel/pack.h"
#include "kt_kernel/types.h"
#include "thread_pool.h"

// The emulated tile layer (compiled into the library as kt::amx_emu).
#ifndef KT_AMX_EMULATE
#define KT_AMX_EMULATE 1
#endif
#include "amx/tile.h"
#include "test_support.h"

namespace kt {
namespace {

using test::normal_floats;

// ---------------------------------------------------------------------------
// Tile layer.

using namespace amx_emu;

TileConfig config_of(int c_rows, int c_colsb, int a_colsb) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = kTilePalette;
  cfg.rows[0] = uint8_t(c_rows);
  cfg.colsb[0] = uint16_t(c_colsb);
  cfg.rows[4] = uint8_t(c_rows);  // A: M rows
  cfg.colsb[4] = uint16_t(a_colsb);
  cfg.rows[6] = uint8_t(a_colsb / 4);  // B: K rows
  cfg.colsb[6] = uint16_t(c_colsb);
  return cfg;
}

enum class Signs { kUS, kSU, kSS };

// C[m][n] + sum_k sum_i A[m][4k+i] * B[k][4n+i] (mod 2^32), the SDM's definition.
void int8_dot_case(Signs signs, int M, int N, int K, uint32_t seed, bool saturate) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> a(16 * 64), b(16 * 64);
  std::vector<int32_t> c(16 * 16);
  for (auto& v : a) v = saturate ? 255 : uint8_t(rng());
  for (auto& v : b) v = saturate ? 127 : uint8_t(rng());
  for (auto& v : c) v = saturate ? std::numeric_limits<int32_t>::max() : int32_t(rng());
  const bool as = signs != Signs::kUS, bs = signs != Signs::kSU;
  std::vector<int32_t> want(16 * 16);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      uint32_t acc = uint32_t(c[m * 16 + n]);
      for (int k = 0; k < K; ++k)
        for (int i = 0; i < 4; ++i) {
          const int x = as ? int(int8_t(a[m * 64 + 4 * k + i])) : int(a[m * 64 + 4 * k + i]);
          const int y = bs ? int(int8_t(b[k * 64 + 4 * n + i])) : int(b[k * 64 + 4 * n + i]);
          acc += uint32_t(x * y);
        }
      want[m * 16 + n] = int32_t(acc);
    }
  tile_config(config_of(M, 4 * N, 4 * K));
  tile_load<4>(a.data(), 64);
  tile_load<6>(b.data(), 64);
  tile_load<0>(c.data(), 64);
  switch (signs) {
    case Signs::kUS: tile_dpbusd<0, 4, 6>(); break;
    case Signs::kSU: tile_dpbsud<0, 4, 6>(); break;
    case Signs::kSS: tile_dpbssd<0, 4, 6>(); break;
  }
  std::vector<int32_t> got(16 * 16, 0x5a5a5a5a);
  tile_store<0>(got.data(), 64);
  tile_release();
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      if (m < M && n < N)
        ASSERT_EQ(got[m * 16 + n], want[m * 16 + n]) << "m " << m << " n " << n;
      else
        ASSERT_EQ(got[m * 16 + n], 0x5a5a5a5a) << "store wrote outside rows x colsb: m " << m << " n " << n;
    }
}

TEST(AmxTileEmulation, Int8DotProductsFullTiles) {
  for (uint32_t seed = 1; seed <= 3; ++seed) {
    int8_dot_case(Signs::kUS, 16, 16, 16, seed, false);
    int8_dot_case(Signs::kSU, 16, 16, 16, seed, false);
    int8_dot_case(Signs::kSS, 16, 16, 16, seed, false);
  }
}

TEST(AmxTileEmulation, Int8DotProductsPartialShapes) {
  int8_dot_case(Signs::kUS, 5, 7, 3, 11, false);
  int8_dot_case(Signs::kSU, 16, 16, 8, 12, false);  // the INT4 group-32 shape (A colsb 32, B 8 rows)
  int8_dot_case(Signs::kSS, 1, 1, 1, 13, false);
}

TEST(AmxTileEmulation, Int8AccumulationWrapsAround) {
  // INT32_MAX + 16 * 4 * 255 * 127 (u8 x s8) wraps to a negative number.
  int8_dot_case(Signs::kUS, 16, 16, 16, 0, true);
  // Hand-computed: INT32_MAX + 4 * 255 * 127 = 2147483647 + 129540 -> -2147354109.
  tile_config(config_of(1, 4, 4));
  const uint8_t a[4] = {255, 255, 255, 255}, b[4] = {127, 127, 127, 127};
  const int32_t c = std::numeric_limits<int32_t>::max();
  tile_load<4>(a, 4);
  tile_load<6>(b, 4);
  tile_load<0>(&c, 4);
  tile_dpbusd<0, 4, 6>();
  int32_t got = 0;
  tile_store<0>(&got, 4);
  EXPECT_EQ(got, -2147354109);
  // Signed x signed of the same bytes: 4 * (-1) * 127 = -508.
  tile_zero<0>();
  tile_dpbssd<0, 4, 6>();
  tile_store<0>(&got, 4);
  EXPECT_EQ(got, -508);
  // Signed x unsigned: 4 * (-1) * 127 again (127 reads the same both ways).
  tile_zero<0>();
  tile_dpbsud<0, 4, 6>();
  tile_store<0>(&got, 4);
  EXPECT_EQ(got, -508);
  tile_release();
}

TEST(AmxTileEmulation, LoadAndStoreMoveRowsByColsbOnly) {
  // A 3 x 8 tile loaded with a 100-byte stride and stored with a 64-byte one.
  std::vector<uint8_t> src(16 * 100), out(16 * 64, 0x11);
  for (size_t i = 0; i < src.size(); ++i) src[i] = uint8_t(i * 7 + 1);
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = kTilePalette;
  cfg.rows[1] = 3;
  cfg.colsb[1] = 8;
  tile_config(cfg);
  tile_load<1>(src.data(), 100);
  tile_store<1>(out.data(), 64);
  tile_release();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 64; ++c)
      EXPECT_EQ(out[r * 64 + c], (r < 3 && c < 8) ? src[r * 100 + c] : 0x11) << r << " " << c;
}

uint16_t bf(float f) { return f32_to_bf16(f); }

// One fp32 element of tdpbf16ps: C (1 x 1) += sum over k of pairs.
float bf16_dot1(float c, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  const int K = int(a.size() / 2);
  tile_config(config_of(1, 4, 4 * K));
  std::vector<uint16_t> bt(a.size());
  for (size_t i = 0; i < b.size(); ++i) bt[i] = b[i];  // B rows: one 4-byte pair per k (N = 1)
  tile_load<4>(a.data(), 64);
  tile_load<6>(bt.data(), 4);
  tile_load<0>(&c, 4);
  tile_dpbf16ps<0, 4, 6>();
  float got = -1.0f;
  tile_store<0>(&got, 4);
  tile_release();
  return got;
}

TEST(AmxTileEmulation, Bf16DotProductExactValues) {
  // Small integers: every product and sum is exact in fp32.
  std::mt19937 rng(5);
  std::vector<uint16_t> a(16 * 32), b(16 * 32);
  std::vector<float> af(a.size()), bfv(b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    af[i] = float(int(rng() % 17) - 8);
    bfv[i] = float(int(rng() % 17) - 8);
    a[i] = bf(af[i]);
    b[i] = bf(bfv[i]);
  }
  std::vector<float> c(16 * 16, 0.5f);
  tile_config(config_of(16, 64, 64));
  tile_load<4>(a.data(), 64);
  tile_load<6>(b.data(), 64);
  tile_load<0>(c.data(), 64);
  tile_dpbf16ps<0, 4, 6>();
  std::vector<float> got(16 * 16);
  tile_store<0>(got.data(), 64);
  tile_release();
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float want = 0.5f;
      for (int k = 0; k < 16; ++k)
        for (int e = 0; e < 2; ++e) want += af[m * 32 + 2 * k + e] * bfv[k * 32 + 2 * n + e];
      ASSERT_EQ(got[m * 16 + n], want) << m << " " << n;
    }
}

TEST(AmxTileEmulation, Bf16RoundsEachAddToNearestEvenInOrder) {
  const float tiny = std::ldexp(1.0f, -24);  // half an ulp of 1.0
  // 1 + 2^-24 ties to 1 (even), twice: 1. Summing the pair first would give 1 + 2^-23.
  EXPECT_EQ(bf16_dot1(1.0f, {bf(tiny), bf(tiny)}, {bf(1.0f), bf(1.0f)}), 1.0f);
  // (1 + 2^-23) + 2^-24 ties to the even neighbour 1 + 2^-22.
  const float odd = 1.0f + std::ldexp(1.0f, -23);
  EXPECT_EQ(bf16_dot1(odd, {bf(tiny), bf(0.0f)}, {bf(1.0f), bf(1.0f)}), 1.0f + std::ldexp(1.0f, -22));
  // The even element is added before the odd one: (-2^40 + 1) + 2^40 = 0,
  // whereas the odd one first would give (-2^40 + 2^40) + 1 = 1.
  const float big = std::ldexp(1.0f, 40);
  EXPECT_EQ(bf16_dot1(-big, {bf(1.0f), bf(big)}, {bf(1.0f), bf(1.0f)}), 0.0f);
  // Pairs in k order: k = 0 cancels exactly, then k = 1 adds 1.
  EXPECT_EQ(bf16_dot1(0.0f, {bf(big), bf(-big), bf(1.0f), bf(0.0f)}, {bf(1.0f), bf(1.0f), bf(1.0f), bf(0.0f)}), 1.0f);
}

TEST(AmxTileEmulation, Bf16FlushesDenormalInputsAndOutputs) {
  const uint16_t denormal_bf16 = 0x0001;                 // 2^-133
  const uint16_t two_100 = bf(std::ldexp(1.0f, 100));
  // Denormal input times 2^100 would be 2^-33 in IEEE arithmetic; AMX reads the input as 0.
  EXPECT_EQ(bf16_dot1(0.0f, {denormal_bf16, 0}, {two_100, 0}), 0.0f);
  // 2^-100 * 2^-30 = 2^-130 is a denormal result: flushed to 0.
  EXPECT_EQ(bf16_dot1(0.0f, {bf(std::ldexp(1.0f, -100)), 0}, {bf(std::ldexp(1.0f, -30)), 0}), 0.0f);
  // A denormal accumulator is read as 0 (and 0 + 0 stays 0).
  const float denormal_f32 = std::ldexp(1.0f, -140);
  ASSERT_NE(denormal_f32, 0.0f);
  EXPECT_EQ(bf16_dot1(denormal_f32, {0, 0}, {0, 0}), 0.0f);
  // Our reading of the SDM's "output denormals are flushed": every fp32 result
  // of the pseudocode, the product included. 2^-125 + (2^-100 * 2^-30) keeps
  // 2^-125 because the denormal product 2^-130 is flushed first (to be
  // confirmed on AMX hardware; kernels never see such values).
  EXPECT_EQ(bf16_dot1(std::ldexp(1.0f, -125), {bf(std::ldexp(1.0f, -100)), 0}, {bf(std::ldexp(1.0f, -30)), 0}),
            std::ldexp(1.0f, -125));
  // A normal sum stays.
  EXPECT_EQ(bf16_dot1(std::ldexp(1.0f, -120), {0, 0}, {0, 0}), std::ldexp(1.0f, -120));
  // Sum falling into the denormal range: 2^-125 - 1.5 * 2^-126... = 2^-127: flushed.
  EXPECT_EQ(bf16_dot1(std::ldexp(1.0f, -125), {bf(-std::ldexp(1.0f, -100)), 0}, {bf(std::ldexp(1.5f, -26)), 0}),
            0.0f);
}

// ---------------------------------------------------------------------------
// Backends against the scalar reference.

// Named tolerances (relative).
constexpr double kIntGateUpTol = 1e-6;  // per element; the emulated build is in fact bit-exact
constexpr double kBf16Tol = 1e-5;       // relative to max |ref| (the reference accumulates in double)

struct FormatCase {
  const char* name;
  QuantScheme scheme;
  uint32_t group;
  std::vector<size_t> cols;
};

const std::vector<FormatCase>& format_cases() {
  static const std::vector<FormatCase> cases = {
      {"Bf16", QuantScheme::kBF16, 0, {64, 96, 100, 128, 192}},
      {"Int8", QuantScheme::kInt8PerChannel, 0, {64, 96, 100, 128, 192}},
      {"Int4SymPerChannel", QuantScheme::kInt4Sym, 0, {64, 100, 192}},
      {"Int4SymG32", QuantScheme::kInt4Sym, 32, {64, 96, 192}},
      {"Int4SymG64", QuantScheme::kInt4Sym, 64, {64, 128, 192}},
      {"Int4SymG128", QuantScheme::kInt4Sym, 128, {128}},
      {"Int4AsymPerChannel", QuantScheme::kInt4Asym, 0, {100}},
      {"Int4AsymG32", QuantScheme::kInt4Asym, 32, {96}},
      {"Int4AsymG64", QuantScheme::kInt4Asym, 64, {192}},
      {"Int4AsymG128", QuantScheme::kInt4Asym, 128, {128}},
  };
  return cases;
}

const std::vector<size_t> kRowsList = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33, 64};
const std::vector<size_t> kTokensList = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33};

struct PackedW {
  PackedGeometry geo;
  std::vector<uint8_t> bytes;
  PackedMatrixView view;
};

PackedW pack_random(QuantScheme s, size_t rows, size_t cols, uint32_t group, std::mt19937& rng) {
  PackedW p;
  EXPECT_TRUE(packed_geometry(s, uint32_t(rows), uint32_t(cols), group, &p.geo));
  const auto w = normal_floats(rng, rows * cols);
  p.bytes.assign(p.geo.total_bytes, 0);
  pack_matrix(s, p.geo, w.data(), DType::kF32, cols, p.bytes.data());
  p.view = make_packed_view(s, p.geo, p.bytes.data());
  return p;
}

struct Acts {
  std::vector<uint8_t> data;
  std::vector<float> scale;
  std::vector<int32_t> sums;
  ActsBuffer buf;
};

Acts prepare(const FormatKernels& fk, QuantScheme s, const std::vector<float>& x, size_t rows, size_t k) {
  Acts a;
  const size_t rb = acts_row_bytes(s, k), gs = acts_group_sums_per_row(s, k);
  a.data.assign(rows * rb, 0xcd);
  a.scale.assign(rows, -1.0f);
  a.sums.assign(rows * gs + 1, -7);
  a.buf = ActsBuffer{a.data.data(), rb, a.scale.data(), a.sums.data(), gs};
  fk.prepare_acts(x.data(), rows, k, k, a.buf);
  return a;
}

uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

class AmxKernels : public ::testing::TestWithParam<std::tuple<std::string, size_t>> {
 protected:
  void SetUp() override {
    backend_ = std::get<0>(GetParam());
    fc_ = &format_cases()[std::get<1>(GetParam())];
    const std::string why = backend_unavailable_reason(backend_);
    if (!why.empty()) GTEST_SKIP() << backend_ << " unavailable: " << why;
    // The format really runs on the AMX kernels (not borrowed from another backend).
    ASSERT_EQ(format_provider(backend_, fc_->scheme), backend_);
  }

  // One case: gate_up and down of the backend against the scalar reference.
  void run_case(size_t rows, size_t cols, size_t tokens, unsigned variant);

  std::string backend_;
  const FormatCase* fc_ = nullptr;
};

void AmxKernels::run_case(size_t rows, size_t cols, size_t tokens, unsigned variant) {
  const QuantScheme s = fc_->scheme;
  const bool gather = variant & 1, offset = variant & 2, oai = variant & 4, subrange = variant & 8;
  SCOPED_TRACE(::testing::Message() << fc_->name << " rows " << rows << " cols " << cols << " tokens " << tokens
                                    << " gather " << gather << " offset " << offset << " oai " << oai
                                    << " subrange " << subrange);
  std::mt19937 rng(uint32_t(rows * 131 + cols * 7 + tokens * 1009 + variant));
  const FormatKernels& ref = kernels_for(backend_kernels("scalar"), s);
  const FormatKernels& tst = kernels_for(backend_kernels(backend_), s);

  PackedW gate = pack_random(s, rows, cols, fc_->group, rng);
  PackedW up = pack_random(s, rows, cols, fc_->group, rng);
  PackedW down = pack_random(s, rows, cols, fc_->group, rng);

  // Activations: a wider row when viewed from column 64 (a NUMA slice), spare
  // rows when gathered through row_index.
  const size_t col0 = offset ? 64 : 0, width = col0 + cols;
  const size_t act_rows = gather ? tokens + 3 : tokens;
  const auto x = normal_floats(rng, act_rows * width);
  Acts acts = prepare(ref, s, x, act_rows, width);
  std::vector<int32_t> index(tokens);
  for (size_t t = 0; t < tokens; ++t) index[t] = int32_t((t * 5 + 2) % act_rows);
  const size_t elem = s == QuantScheme::kBF16 ? 2 : 1;
  ActsView a;
  a.data = acts.data.data() + col0 * elem;
  a.row_bytes = acts.buf.row_bytes;
  a.row_scale = acts.scale.data();
  a.group_sums = acts.buf.group_sums_stride ? acts.sums.data() + col0 / kActSumGroup : nullptr;
  a.group_sums_stride = acts.buf.group_sums_stride;
  a.row_index = gather ? index.data() : nullptr;
  a.rows = tokens;

  const size_t nb = gate.geo.rows_padded / kRowBlock;
  const size_t bb = (subrange && nb >= 2) ? 1 : 0;
  const size_t be = (subrange && nb >= 3) ? nb - 1 : nb;
  const size_t n_begin = bb * kRowBlock, n_end = std::min(be * kRowBlock, rows);
  const size_t ld = gate.geo.rows_padded + 3;
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  const bool is_int = s != QuantScheme::kBF16;

  ActivationParams act;
  if (oai) {
    act.swiglu_limit = 7.0f;
    act.swiglu_alpha = 1.702f;
  }

  // gate/up: outputs poisoned with NaN; columns outside the range stay NaN.
  std::vector<float> h_ref(tokens * ld, qnan), h_tst(tokens * ld, qnan);
  ref.gate_up(gate.view, up.view, bb, be, a, act, h_ref.data(), ld);
  tst.gate_up(gate.view, up.view, bb, be, a, act, h_tst.data(), ld);
  double hmax = 0.0;
  for (size_t t = 0; t < tokens; ++t)
    for (size_t n = n_begin; n < n_end; ++n) hmax = std::max(hmax, std::fabs(double(h_ref[t * ld + n])));
  for (size_t t = 0; t < tokens; ++t)
    for (size_t n = 0; n < ld; ++n) {
      const float r = h_ref[t * ld + n], g = h_tst[t * ld + n];
      if (n < n_begin || n >= n_end) {
        ASSERT_EQ(bits(g), bits(qnan)) << "gate_up wrote outside its range: t " << t << " n " << n;
        continue;
      }
      ASSERT_FALSE(std::isnan(r)) << "t " << t << " n " << n;
      const double tol = is_int ? kIntGateUpTol * std::fabs(double(r)) + 1e-30 : kBf16Tol * hmax + 1e-30;
      ASSERT_NEAR(g, r, tol) << "gate_up t " << t << " n " << n;
    }

  // down: out_rows[m][n] += w * v. In-range columns start finite; the rest
  // are poisoned with NaN on even rows and with -0.0 on odd rows: adding
  // anything to NaN leaves its bits unchanged, but adding the +0 of a padded
  // (all-zero) weight row turns -0.0 into +0.0, so a stray write shows.
  std::vector<float> o_ref(tokens * ld), rw(tokens);
  auto poison = [&](size_t t) { return t % 2 ? -0.0f : qnan; };
  for (size_t t = 0; t < tokens; ++t) {
    rw[t] = 0.25f + float(t % 7) * 0.125f;
    for (size_t n = 0; n < ld; ++n)
      o_ref[t * ld + n] = (n >= n_begin && n < n_end) ? float(int(n % 13) - 6) * 0.0625f : poison(t);
  }
  std::vector<float> o_tst = o_ref;
  std::vector<float*> r_ref(tokens), r_tst(tokens);
  for (size_t t = 0; t < tokens; ++t) {
    r_ref[t] = o_ref.data() + t * ld;
    r_tst[t] = o_tst.data() + t * ld;
  }
  ref.down(down.view, bb, be, a, rw.data(), r_ref.data());
  tst.down(down.view, bb, be, a, rw.data(), r_tst.data());
  if (is_int) {
    ASSERT_EQ(0, std::memcmp(o_ref.data(), o_tst.data(), o_ref.size() * sizeof(float))) << "down not bit-exact";
  } else {
    double omax = 0.0;
    for (size_t t = 0; t < tokens; ++t)
      for (size_t n = n_begin; n < n_end; ++n) omax = std::max(omax, std::fabs(double(o_ref[t * ld + n])));
    for (size_t t = 0; t < tokens; ++t)
      for (size_t n = 0; n < ld; ++n) {
        if (n < n_begin || n >= n_end) {
          ASSERT_EQ(bits(o_tst[t * ld + n]), bits(poison(t))) << "down wrote outside its range: t " << t << " n " << n;
          continue;
        }
        ASSERT_NEAR(o_tst[t * ld + n], o_ref[t * ld + n], kBf16Tol * omax + 1e-30) << "down t " << t << " n " << n;
      }
  }
}

TEST_P(AmxKernels, MatchScalarOverHostileSizes) {
  // Every (rows, tokens) pair of the lists for every width; the variant bits
  // (gather, column offset, activation, partial block range) cycle through
  // their 16 combinations along the way.
  unsigned variant = 0;
  for (size_t cols : fc_->cols)
    for (size_t rows : kRowsList)
      for (size_t tokens : kTokensList) {
        run_case(rows, cols, tokens, variant++ % 16);
        if (HasFatalFailure()) return;
      }
}

TEST_P(AmxKernels, PrepareActsMatchesScalarBytes) {
  const QuantScheme s = fc_->scheme;
  const FormatKernels& ref = kernels_for(backend_kernels("scalar"), s);
  const FormatKernels& tst = kernels_for(backend_kernels(backend_), s);
  for (size_t k : {size_t(32), size_t(100), size_t(192)}) {
    std::mt19937 rng{uint32_t(k)};
    auto x = normal_floats(rng, 5 * k);
    x[3] = 0.0f;
    if (k > 64) std::fill(x.begin() + long(k), x.begin() + long(2 * k), 0.0f);  // an all-zero row
    const Acts r = prepare(ref, s, x, 5, k);
    const Acts t = prepare(tst, s, x, 5, k);
    EXPECT_EQ(r.data, t.data) << "k " << k;
    if (s != QuantScheme::kBF16) {
      for (size_t i = 0; i < 5; ++i) EXPECT_EQ(bits(r.scale[i]), bits(t.scale[i])) << "k " << k << " row " << i;
    }
    if (scheme_is_int4(s)) {
      EXPECT_EQ(r.sums, t.sums) << "k " << k;
    }
  }
}

std::vector<size_t> format_indices() {
  std::vector<size_t> v;
  for (size_t i = 0; i < format_cases().size(); ++i) v.push_back(i);
  return v;
}

INSTANTIATE_TEST_SUITE_P(Backends, AmxKernels,
                         ::testing::Combine(::testing::Values(std::string("amx-emu"), std::string("amx")),
                                            ::testing::ValuesIn(format_indices())),
                         [](const ::testing::TestParamInfo<AmxKernels::ParamType>& info) {
                           std::string b = std::get<0>(info.param);
                           for (auto& ch : b)
                             if (ch == '-') ch = '_';
                           return b + "_" + format_cases()[std::get<1>(info.param)].name;
                         });

// The whole layer on the emulated tiles, through the MoE orchestration (two
// NUMA slices, so down reads column-offset views; several threads, each with
// its own tile unit), against the same layer on the scalar backend.
TEST(AmxBackend, MoeLayerOnEmulatedTilesMatchesScalar) {
  ThreadPool pool(3, {0, 0}, false);
  struct Fmt {
    QuantScheme s;
    uint32_t group;
    double tol;  // relative to max |y|
  };
  for (const Fmt f : {Fmt{QuantScheme::kInt8PerChannel, 0, 1e-6}, Fmt{QuantScheme::kInt4Sym, 32, 1e-6},
                      Fmt{QuantScheme::kInt4Asym, 64, 1e-6}, Fmt{QuantScheme::kBF16, 0, 1e-5}}) {
    SCOPED_TRACE(int(f.s));
    MoeConfig cfg;
    cfg.num_experts = 5;
    cfg.top_k = 2;
    cfg.hidden = 192;
    cfg.intermediate = 256;
    cfg.scheme = f.s;
    cfg.group_size = f.group;
    MoeLayer layer(cfg, pool);
    std::mt19937 rng(17);
    const auto gate = normal_floats(rng, size_t(5) * 256 * 192), up = normal_floats(rng, size_t(5) * 256 * 192);
    const auto down = normal_floats(rng, size_t(5) * 192 * 256);
    layer.load_dense(gate.data(), up.data(), down.data(), DType::kF32, 5, nullptr, nullptr);
    const size_t T = 21;
    const auto x = normal_floats(rng, T * 192);
    std::vector<int32_t> ids(T * 2);
    std::vector<float> w(T * 2);
    for (size_t t = 0; t < T; ++t) {
      ids[2 * t] = int32_t(t % 4);            // expert 4 gets tokens only through the second slot
      ids[2 * t + 1] = t % 5 == 3 ? -1 : int32_t((t * 3 + 1) % 5);
      w[2 * t] = 0.6f;
      w[2 * t + 1] = 0.4f;
    }
    std::vector<float> y_ref(T * 192), y_emu(T * 192);
    MoeForwardArgs args;
    args.tokens = T;
    args.x = x.data();
    args.x_stride = 192;
    args.ids = ids.data();
    args.ids_stride = 2;
    args.weights = w.data();
    args.weights_stride = 2;
    args.y_stride = 192;
    set_backend("scalar");
    args.y = y_ref.data();
    layer.forward(args);
    set_backend("amx-emu");
    args.y = y_emu.data();
    layer.forward(args);
    EXPECT_EQ(last_used_backend(), "amx-emu");
    set_backend("");
    double ymax = 0.0;
    for (float v : y_ref) ymax = std::max(ymax, std::fabs(double(v)));
    ASSERT_GT(ymax, 0.0);
    for (size_t i = 0; i < y_ref.size(); ++i) ASSERT_NEAR(y_emu[i], y_ref[i], f.tol * ymax) << i;
  }
}

TEST(AmxBackend, RealAmxIsUnavailableWithoutTheHardware) {
  const CpuFeatures& cpu = cpu_features();
  if (cpu.has_amx_backend()) GTEST_SKIP() << "this CPU has AMX; the kernel tests above ran on it";
  const std::string why = backend_unavailable_reason("amx");
  EXPECT_FALSE(why.empty());
  EXPECT_NE(why.find("AMX"), std::string::npos) << why;
  EXPECT_THROW(backend_kernels("amx"), std::invalid_argument);
}

TEST(AmxBackend, EmulationIsAvailableEverywhereAndProvidesEveryFormat) {
  ASSERT_EQ(backend_unavailable_reason("amx-emu"), "");
  const KernelTable& t = backend_kernels("amx-emu");
  EXPECT_STREQ(t.name, "amx-emu");
  for (int s = 0; s < kNumSchemes; ++s) {
    // Grouped INT8 and FP8 have no AMX kernel yet: the emulation borrows the scalar ones.
    const bool borrowed = QuantScheme(s) == QuantScheme::kInt8Group || QuantScheme(s) == QuantScheme::kFP8Block;
    EXPECT_EQ(format_provider("amx-emu", QuantScheme(s)), borrowed ? "scalar" : "amx-emu")
        << s;
    EXPECT_TRUE(t.formats[s].prepare_acts && t.formats[s].gate_up && t.formats[s].down) << s;
  }
}

}  // namespace
}  // namespace kt
