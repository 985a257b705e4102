// Internal pass sizing (src/moe/pass_size.h): a pass's token count keeps to
// [kMinTokensPerPass, kMaxTokensPerPass], its scratch to the budget where the
// floor allows, and the passes of one call are as even as the counts allow.
#include <gtest/gtest.h>

#include <algorithm>

#include "moe/pass_size.h"

namespace kt {
namespace {

MoeConfig config(uint32_t hidden, uint32_t inter, uint32_t top_k, QuantScheme scheme) {
  MoeConfig c;
  c.num_experts = 64;
  c.top_k = top_k;
  c.hidden = hidden;
  c.intermediate = inter;
  c.scheme = scheme;
  return c;
}

size_t passes(size_t tokens, size_t per_pass) { return (tokens + per_pass - 1) / per_pass; }

TEST(PassSize, BytesPerTokenCountEveryBuffer) {
  // x: fp32 + 1 byte encoded + 1 slice's fp32 output; 8 intermediate rows of
  // fp32 + 1 byte. BF16 encodes in 2 bytes; a second slice adds an output row.
  EXPECT_EQ(pass_scratch_bytes_per_token(config(2048, 768, 8, QuantScheme::kInt8PerChannel), 1),
            2048u * 9 + 8u * 768 * 5);
  EXPECT_EQ(pass_scratch_bytes_per_token(config(2048, 768, 8, QuantScheme::kBF16), 2), 2048u * 14 + 8u * 768 * 6);
}

TEST(PassSize, SmallModelsRunLargePrefillsInOnePass) {
  const MoeConfig qwen3 = config(2048, 768, 8, QuantScheme::kInt8PerChannel);  // ~49 KB per token
  EXPECT_EQ(tokens_per_pass(qwen3, 1, 1), 1u);
  EXPECT_EQ(tokens_per_pass(qwen3, 1, 2048), 2048u);
  EXPECT_EQ(tokens_per_pass(qwen3, 1, kMaxTokensPerPass), kMaxTokensPerPass);
  EXPECT_EQ(tokens_per_pass(qwen3, 1, 0), kMaxTokensPerPass);
  // Over the cap: even passes, none larger than the cap.
  EXPECT_EQ(tokens_per_pass(qwen3, 1, kMaxTokensPerPass + 1), kMaxTokensPerPass / 2 + 1);
  EXPECT_EQ(tokens_per_pass(qwen3, 1, 9000), 3000u);
}

TEST(PassSize, WideModelsAreBoundedByTheBudget) {
  const MoeConfig dsv3 = config(7168, 2048, 8, QuantScheme::kInt8PerChannel);  // ~146 KB per token
  const size_t cap = tokens_per_pass(dsv3, 1, 0);
  EXPECT_EQ(cap, kPassScratchBudget / pass_scratch_bytes_per_token(dsv3, 1));
  EXPECT_GT(cap, kMinTokensPerPass);
  EXPECT_LT(cap, kMaxTokensPerPass);
  EXPECT_LE(cap * pass_scratch_bytes_per_token(dsv3, 1), kPassScratchBudget);
  EXPECT_EQ(tokens_per_pass(dsv3, 1, 2048), 2048u);
  EXPECT_EQ(tokens_per_pass(dsv3, 1, 3000), 1500u);
}

TEST(PassSize, TheFloorHoldsWhenOneTokenIsHuge) {
  // 1 MB of intermediate per token: the budget alone would allow ~300 tokens.
  const MoeConfig huge = config(8192, 32768, 8, QuantScheme::kBF16);
  EXPECT_EQ(tokens_per_pass(huge, 1, 0), kMinTokensPerPass);
  EXPECT_EQ(tokens_per_pass(huge, 1, 1500), 750u);
}

TEST(PassSize, PassesCoverTheCallEvenly) {
  for (const MoeConfig& c : {config(2048, 768, 8, QuantScheme::kInt8PerChannel),
                             config(7168, 2048, 8, QuantScheme::kInt4Sym), config(4096, 14336, 2, QuantScheme::kBF16)}) {
    const size_t cap = tokens_per_pass(c, 1, 0);
    for (size_t tokens : {size_t(1), size_t(1023), size_t(1025), size_t(2049), size_t(5000), size_t(8192),
                          size_t(20000)}) {
      const size_t per = tokens_per_pass(c, 1, tokens);
      ASSERT_GE(per, 1u);
      EXPECT_LE(per, cap) << tokens;
      // No more passes than the cap requires, and the last one not much shorter.
      EXPECT_EQ(passes(tokens, per), passes(tokens, cap)) << tokens;
      EXPECT_GT(tokens - (passes(tokens, per) - 1) * per + passes(tokens, per), per) << tokens;
    }
  }
}

}  // namespace
}  // namespace kt
