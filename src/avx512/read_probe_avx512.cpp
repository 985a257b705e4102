// The read loop of the demo's bandwidth probe (src/bandwidth_probe.cpp) with
// 512-bit loads: at baseline flags the loop issues 16-byte loads and reaches
// well under what the AVX-512 kernels read, which would make "fraction of
// bandwidth" exceed 100%. Compiled here because this folder gets AVX-512 flags.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace kt {

uint64_t read_sum_u64__avx512(const uint64_t* p, size_t n) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a, e = a, f = a, g = a, h = a;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {  // eight independent accumulators: loads, not adds, limit the loop
    // Prefetch 4 KiB ahead, as the GEMV kernels do: the hardware prefetcher
    // alone leaves bandwidth unused, and the probe must not be slower than
    // the kernels it is the yardstick for.
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 512), _MM_HINT_T0);
    a = _mm512_add_epi64(a, _mm512_loadu_si512(p + i));
    b = _mm512_add_epi64(b, _mm512_loadu_si512(p + i + 8));
    c = _mm512_add_epi64(c, _mm512_loadu_si512(p + i + 16));
    d = _mm512_add_epi64(d, _mm512_loadu_si512(p + i + 24));
    e = _mm512_add_epi64(e, _mm512_loadu_si512(p + i + 32));
    f = _mm512_add_epi64(f, _mm512_loadu_si512(p + i + 40));
    g = _mm512_add_epi64(g, _mm512_loadu_si512(p + i + 48));
    h = _mm512_add_epi64(h, _mm512_loadu_si512(p + i + 56));
  }
  a = _mm512_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)),
                       _mm512_add_epi64(_mm512_add_epi64(e, f), _mm512_add_epi64(g, h)));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, a);
  uint64_t s = 0;
  for (int l = 0; l < 8; ++l) s += lanes[l];
  for (; i < n; ++i) s += p[i];
  return s;
}

}  // namespace kt
