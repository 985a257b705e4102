// Helpers shared by the C++ test files.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

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

// ThreadSanitizer refuses to start threads in the child of a multi-threaded
// fork (die_after_fork), which is what the fork tests check: they skip there.
#if defined(__SANITIZE_THREAD__)
constexpr bool kForkTestsSupported = false;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kForkTestsSupported = false;
#else
constexpr bool kForkTestsSupported = true;
#endif
#else
constexpr bool kForkTestsSupported = true;
#endif

// Forks; the child runs body() under a 30 s alarm and leaves with _exit(0)
// if it returned true, else 1 (gtest assertions in a child report nothing).
// Returns the child's exit code, or 128 + the signal that ended it (SIGALRM:
// a hang).
template <typename Body>
int run_in_forked_child(Body body) {
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    alarm(30);
    _exit(body() ? 0 : 1);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace test
}  // namespace kt
