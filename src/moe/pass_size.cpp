#include "moe/pass_size.h"

#include <algorithm>

namespace kt {

size_t pass_scratch_bytes_per_token(const MoeConfig& cfg, size_t slices) {
  const size_t elem = scheme_bf16_acts(cfg.scheme) ? 2 : 1;
  return size_t(cfg.hidden) * (4 + elem + 4 * slices) + size_t(cfg.top_k) * cfg.intermediate * (4 + elem);
}

size_t tokens_per_pass(const MoeConfig& cfg, size_t slices, size_t tokens) {
  const size_t per_token = std::max<size_t>(1, pass_scratch_bytes_per_token(cfg, slices));
  const size_t cap = std::min(kMaxTokensPerPass, std::max(kMinTokensPerPass, kPassScratchBudget / per_token));
  if (tokens == 0) return cap;
  const size_t passes = (tokens + cap - 1) / cap;
  return (tokens + passes - 1) / passes;
}

}  // namespace kt
