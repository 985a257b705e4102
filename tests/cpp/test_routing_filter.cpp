// Expert deferral's pair filter in routing: kMainOnly and kDeferredOnly split
// each token's CPU pairs exactly (disjoint, together all of kAll), the
// deferred ones being the d lowest weights (ties: the later k position), and
// GPU-masked or invalid ids are never counted among them.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "moe/routing.h"

namespace kt {
namespace {

std::set<int32_t> slots_of(const Routing& r) { return {r.pair_slot.begin(), r.pair_slot.end()}; }

TEST(RoutingFilter, MainAndDeferredPartitionTheCpuPairs) {
  const uint32_t E = 11, K = 5;
  const size_t T = 40;
  std::mt19937 rng(7);
  std::vector<int64_t> ids(T * K);
  std::vector<float> w(T * K);
  for (size_t t = 0; t < T; ++t) {
    std::vector<int64_t> perm(E);
    for (uint32_t e = 0; e < E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (size_t j = 0; j < K; ++j) {
      ids[t * K + j] = (rng() % 7 == 0) ? -1 : perm[j];
      w[t * K + j] = float(rng() % 4) * 0.25f;  // many ties
    }
  }
  std::vector<uint8_t> mask(E, 0), loaded(E, 1);
  mask[3] = mask[8] = 1;
  MoeForwardArgs a;
  a.tokens = T;
  a.ids = ids.data();
  a.ids_int64 = true;
  a.ids_stride = K;
  a.weights = w.data();
  a.weights_stride = K;
  a.skip_mask = mask.data();
  for (uint32_t d : {0u, 1u, 2u, K}) {
    Routing all, main, def;
    ASSERT_EQ(build_routing(a, 0, T, E, K, loaded.data(), &all), -1);
    a.deferred_per_token = d;
    a.pair_filter = PairFilter::kMainOnly;
    ASSERT_EQ(build_routing(a, 0, T, E, K, loaded.data(), &main), -1);
    a.pair_filter = PairFilter::kDeferredOnly;
    ASSERT_EQ(build_routing(a, 0, T, E, K, loaded.data(), &def), -1);
    a.pair_filter = PairFilter::kAll;
    const auto sa = slots_of(all), sm = slots_of(main), sd = slots_of(def);
    EXPECT_EQ(sm.size() + sd.size(), sa.size()) << "d=" << d;
    std::set<int32_t> u(sm);
    u.insert(sd.begin(), sd.end());
    EXPECT_EQ(u, sa);
    for (size_t t = 0; t < T; ++t) {
      std::vector<std::pair<float, int>> cpu;  // (weight, -j)
      for (size_t j = 0; j < K; ++j) {
        const int64_t e = ids[t * K + j];
        if (e >= 0 && e < E && !mask[size_t(e)]) cpu.push_back({w[t * K + j], -int(j)});
      }
      std::sort(cpu.begin(), cpu.end());
      for (size_t i = 0; i < cpu.size(); ++i) {
        const int32_t slot = int32_t(t * K + size_t(-cpu[i].second));
        EXPECT_EQ(sd.count(slot), i < d ? 1u : 0u) << "t=" << t << " d=" << d;
      }
    }
  }
}

}  // namespace
}  // namespace kt
