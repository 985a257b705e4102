// Routing buckets: the (token, k) pairs of one pass grouped by expert, so
// each expert's tokens are contiguous and each expert's weights are read once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "kt_kernel/moe_layer.h"

namespace kt {

struct Routing {
  std::vector<int32_t> count;        // [E] pairs per expert
  std::vector<int32_t> offset;       // [E + 1] first pair of each expert
  std::vector<int32_t> pair_token;   // [P] token of each pair, relative to the pass
  std::vector<float> pair_weight;    // [P] routing weight
  std::vector<int32_t> pair_slot;    // [P] t * top_k + j, relative to the pass
  std::vector<int32_t> active;       // experts with pairs, most pairs first (scheduling order)
  std::vector<int32_t> active_by_id; // the same experts in id order (summation order: a token's
                                     // result then does not depend on the rest of its batch)
  size_t pairs = 0;
  std::vector<uint8_t> take;         // [n * top_k] pairs kept by args.pair_filter (empty = all)
  std::vector<std::pair<float, int32_t>> rank_scratch;  // one token's (weight, -j), for the filter
};

// Buckets tokens [t0, t0 + n) of args. Ids < 0, >= num_experts or masked are
// skipped. Returns -1, or the first routed expert that is not loaded.
int64_t build_routing(const MoeForwardArgs& args, size_t t0, size_t n, uint32_t num_experts, uint32_t top_k,
                      const uint8_t* loaded, Routing* r);

}  // namespace kt
