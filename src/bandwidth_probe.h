// A quick memory read-bandwidth probe for the demo's "fraction of the
// machine's bandwidth" figure: every pool thread streams its share of a buffer
// much larger than the caches, with 512-bit loads where the CPU has them
// (bench/cpp/probes.cpp has the careful one, with statistics).
#pragma once

#include <cstddef>

namespace kt {

class ThreadPool;

// Best-of-`reps` GB/s (1e9 bytes/s) reading a `bytes` buffer on all threads of
// `pool`. Allocates and first-touches the buffer (by the reading threads).
double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int reps);

}  // namespace kt
