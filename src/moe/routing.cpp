#include "moe/routing.h"

#include <algorithm>
#include <cmath>

namespace kt {
namespace {

int64_t load_id(const MoeForwardArgs& a, size_t t, size_t j) {
  if (a.ids_int64) return static_cast<const int64_t*>(a.ids)[t * a.ids_stride + j];
  return static_cast<const int32_t*>(a.ids)[t * a.ids_stride + j];
}

float load_weight(const MoeForwardArgs& a, size_t t, size_t j) {
  const size_t i = t * a.weights_stride + j;
  switch (a.weights_dtype) {
    case DType::kF32: return static_cast<const float*>(a.weights)[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(a.weights)[i]);
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(a.weights)[i]);
    case DType::kF64: return float(static_cast<const double*>(a.weights)[i]);
  }
  return 0.0f;
}

}  // namespace

int64_t build_routing(const MoeForwardArgs& args, size_t t0, size_t n, uint32_t num_experts, uint32_t top_k,
                      const uint8_t* loaded, Routing* r) {
  r->count.assign(num_experts, 0);
  r->offset.resize(size_t(num_experts) + 1);
  auto cpu_pair = [&](int64_t e) {
    return e >= 0 && e < int64_t(num_experts) && !(args.skip_mask && args.skip_mask[e]);
  };
  // Expert deferral: mark the pairs this call keeps.
  r->take.clear();
  if (args.pair_filter != PairFilter::kAll) {
    r->take.assign(n * top_k, args.pair_filter == PairFilter::kMainOnly ? 1 : 0);
    std::vector<std::pair<float, int32_t>>& order = r->rank_scratch;
    for (size_t t = t0; t < t0 + n; ++t) {
      order.clear();
      for (size_t j = 0; j < top_k; ++j)
        if (cpu_pair(load_id(args, t, j))) order.push_back({load_weight(args, t, j), -int32_t(j)});
      // Lowest weight first; ties: later k first. A NaN weight counts as the
      // lowest: std::sort needs a strict weak order, which < is not with NaN.
      std::sort(order.begin(), order.end(), [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
        const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
        if (a_nan != b_nan) return a_nan;
        if (!a_nan && a.first != b.first) return a.first < b.first;
        return a.second < b.second;
      });
      const size_t d = std::min<size_t>(args.deferred_per_token, order.size());
      for (size_t i = 0; i < d; ++i)
        r->take[(t - t0) * top_k + size_t(-order[i].second)] = args.pair_filter == PairFilter::kDeferredOnly ? 1 : 0;
    }
  }
  auto routed_pair = [&](int64_t e, size_t t, size_t j) {
    return cpu_pair(e) && (r->take.empty() || r->take[(t - t0) * top_k + j]);
  };
  for (size_t t = t0; t < t0 + n; ++t)
    for (size_t j = 0; j < top_k; ++j) {
      const int64_t e = load_id(args, t, j);
      if (!routed_pair(e, t, j)) continue;
      if (!loaded[e]) return e;
      ++r->count[size_t(e)];
    }
  r->offset[0] = 0;
  for (uint32_t e = 0; e < num_experts; ++e) r->offset[e + 1] = r->offset[e] + r->count[e];
  r->pairs = size_t(r->offset[num_experts]);
  r->pair_token.resize(r->pairs);
  r->pair_weight.resize(r->pairs);
  r->pair_slot.resize(r->pairs);
  std::vector<int32_t>& cursor = r->active;  // reused as a cursor, rebuilt below
  cursor.assign(r->offset.begin(), r->offset.end() - 1);
  for (size_t t = t0; t < t0 + n; ++t)
    for (size_t j = 0; j < top_k; ++j) {
      const int64_t e = load_id(args, t, j);
      if (!routed_pair(e, t, j)) continue;
      const int32_t p = cursor[size_t(e)]++;
      r->pair_token[size_t(p)] = int32_t(t - t0);
      r->pair_weight[size_t(p)] = load_weight(args, t, j);
      r->pair_slot[size_t(p)] = int32_t((t - t0) * top_k + j);
    }
  r->active_by_id.clear();
  for (uint32_t e = 0; e < num_experts; ++e)
    if (r->count[e] > 0) r->active_by_id.push_back(int32_t(e));
  r->active = r->active_by_id;
  std::stable_sort(r->active.begin(), r->active.end(),
                   [&](int32_t a, int32_t b) { return r->count[size_t(a)] > r->count[size_t(b)]; });
  return -1;
}

}  // namespace kt
