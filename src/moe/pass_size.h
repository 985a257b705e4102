// How many tokens one internal pass of a layer call covers: as many as a
// scratch budget allows, so that each expert of a large prefill sees as many
// tokens as possible (the GEMM tiles run faster on more rows), while the
// scratch memory of a pass stays bounded.
#pragma once

#include <cstddef>

#include "kt_kernel/moe_layer.h"

namespace kt {

// Scratch memory one pass may take, and the range its token count keeps to.
constexpr size_t kPassScratchBudget = size_t(384) << 20;
constexpr size_t kMinTokensPerPass = 1024;
constexpr size_t kMaxTokensPerPass = 4096;

// Scratch bytes per token of a pass (moe_layer.cpp's buffers): x in fp32 and
// encoded, every slice's fp32 output row, and top_k intermediate rows in
// fp32 and encoded (per-row scales and INT4 sums add a few percent).
size_t pass_scratch_bytes_per_token(const MoeConfig& cfg, size_t slices);

// Tokens per pass for a call over `tokens` tokens: the largest count within
// [kMinTokensPerPass, kMaxTokensPerPass] whose scratch fits the budget, then
// lowered so that the passes split the call evenly (2500 tokens at a cap of
// 2048 run as 1250 + 1250, not 2048 + 452). 0 tokens: the cap.
size_t tokens_per_pass(const MoeConfig& cfg, size_t slices, size_t tokens);

}  // namespace kt
