// Helpers shared by the C++ test files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace kt {
namespace test {

// n draws of N(mean, sigma^2) from rng.
inline std::vector<float> normal_floats(std::mt19937& rng, size_t n, float sigma = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> d(mean, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// The same from a generator of its own, seeded with `seed`.
inline std::vector<float> normal_floats(size_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  return normal_floats(rng, n, sigma);
}

}  // namespace test
}  // namespace kt
