// The MoeLayer constructor's checks and slice plan: sizes beyond its limits
// are refused before any arithmetic (a width near 2^32 used to wrap to an
// empty layer), no slice is ever without columns, and any sub-pool count
// gives the one-sub-pool result up to float32 summation order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kt_kernel/dispatch.h"
#include "kt_kernel/moe_layer.h"
#include "kt_kernel/packed_matrix.h"
#include "test_support.h"
#include "thread_pool.h"

namespace kt {
namespace {

using test::normal_floats;

MoeConfig config(uint32_t E, uint32_t k, uint32_t H, uint32_t I, QuantScheme s = QuantScheme::kBF16,
                 uint32_t group = 0) {
  MoeConfig c;
  c.num_experts = E;
  c.top_k = k;
  c.hidden = H;
  c.intermediate = I;
  c.scheme = s;
  c.group_size = group;
  return c;
}

// The message of the invalid_argument that constructing the layer throws.
std::string rejection(const MoeConfig& c, ThreadPool& pool) {
  try {
    MoeLayer layer(c, pool);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "accepted";
}

TEST(MoeConfig, SizesBeyondTheLimitsAreRefusedNamingTheArgument) {
  ThreadPool pool(1, {0}, false);
  EXPECT_NE(rejection(config(4, 2, UINT32_MAX, 128), pool).find("hidden_size x moe_intermediate_size"),
            std::string::npos);
  EXPECT_NE(rejection(config(4, 2, 64, UINT32_MAX), pool).find("hidden_size x moe_intermediate_size"),
            std::string::npos);
  EXPECT_NE(rejection(config(4, 2, 1u << 16, 1u << 15), pool).find("hidden_size x moe_intermediate_size"),
            std::string::npos);
  EXPECT_NE(rejection(config(kMaxExperts + 1, 2, 64, 128), pool).find("num_experts must be at most"),
            std::string::npos);
  EXPECT_NE(rejection(config(4, kMaxTopK + 1, 64, 128), pool).find("num_experts_per_tok must be at most"),
            std::string::npos);
  // At the limits: accepted (nothing is allocated before load).
  EXPECT_EQ(rejection(config(kMaxExperts, 2, 1u << 15, 1u << 15), pool), "accepted");
}

TEST(MoeConfig, GeometryRefusesPaddingThatWouldWrap) {
  PackedGeometry g;
  EXPECT_FALSE(packed_geometry(QuantScheme::kBF16, UINT32_MAX, 64, 0, &g));
  EXPECT_FALSE(packed_geometry(QuantScheme::kInt8PerChannel, 16, UINT32_MAX, 0, &g));
  EXPECT_TRUE(packed_geometry(QuantScheme::kBF16, 16, 64, 0, &g));
}

TEST(MoeConfig, NoSliceWithoutColumns) {
  for (int subpools = 1; subpools <= 4; ++subpools) {
    ThreadPool pool(subpools, std::vector<int>(size_t(subpools), 0), false);
    for (uint32_t I : {1u, 40u, 128u, 129u, 200u, 256u, 384u, 640u}) {
      SCOPED_TRACE("subpools " + std::to_string(subpools) + ", I " + std::to_string(I));
      MoeLayer layer(config(3, 2, 64, I), pool);
      const int units = int((I + 127) / 128);
      ASSERT_EQ(layer.num_slices(), std::min(subpools, units));
      uint32_t next = 0;
      for (int s = 0; s < layer.num_slices(); ++s) {
        const auto r = layer.slice_range(s);
        EXPECT_EQ(r.first, next);
        EXPECT_LT(r.first, r.second);
        EXPECT_EQ(r.first % 128, 0u);
        next = r.second;
      }
      EXPECT_EQ(next, I);
      EXPECT_THROW(layer.slice_range(layer.num_slices()), std::out_of_range);
      EXPECT_THROW(layer.slice_range(-1), std::out_of_range);
    }
  }
}

// y of one call, the scratch first dirtied by another call (an empty slice's
// partial output was never written and kept what the scratch held).
std::vector<float> run(MoeLayer& layer, uint32_t H, const std::vector<float>& x, const std::vector<int32_t>& ids,
                       const std::vector<float>& w, size_t T, uint32_t k) {
  MoeForwardArgs a;
  a.tokens = T;
  a.x_stride = H;
  a.ids = ids.data();
  a.ids_stride = k;
  a.weights = w.data();
  a.weights_stride = k;
  a.y_stride = H;
  std::vector<float> dirty(x.size());
  for (size_t i = 0; i < x.size(); ++i) dirty[i] = 1e3f * x[x.size() - 1 - i];
  std::vector<float> y(T * H, std::nanf(""));
  a.x = dirty.data();
  a.y = y.data();
  layer.forward(a);
  std::fill(y.begin(), y.end(), std::nanf(""));
  a.x = x.data();
  layer.forward(a);
  return y;
}

TEST(MoeConfig, AnySubpoolCountMatchesOneSubpool) {
  const uint32_t E = 4, k = 2, H = 64;
  const size_t T = 7;
  for (uint32_t I : {40u, 128u, 256u, 384u}) {
    const auto gate = normal_floats(size_t(E) * I * H, 1, 0.125f), up = normal_floats(size_t(E) * I * H, 2, 0.125f);
    const auto down = normal_floats(size_t(E) * H * I, 3, 0.125f);
    const auto x = normal_floats(T * H, 4);
    std::vector<int32_t> ids(T * k);
    std::vector<float> w(T * k);
    for (size_t t = 0; t < T; ++t) {
      ids[t * k] = int32_t(t % E);
      ids[t * k + 1] = int32_t((t + 1) % E);
      w[t * k] = 0.7f;
      w[t * k + 1] = 0.3f;
    }
    std::vector<float> ref;
    for (int subpools = 1; subpools <= 3; ++subpools) {
      SCOPED_TRACE("I " + std::to_string(I) + ", subpools " + std::to_string(subpools));
      ThreadPool pool(3, std::vector<int>(size_t(subpools), 0), false);
      MoeLayer layer(config(E, k, H, I), pool);
      layer.load_dense(gate.data(), up.data(), down.data(), DType::kF32, E, nullptr, nullptr);
      const std::vector<float> y = run(layer, H, x, ids, w, T, k);
      if (subpools == 1) {
        ref = y;
        continue;
      }
      float amax = 0;
      for (float v : ref) amax = std::max(amax, std::fabs(v));
      ASSERT_GT(amax, 0.f);
      for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], ref[i], 1e-5f * amax) << "element " << i;
    }
  }
}

}  // namespace
}  // namespace kt
