// CPUID + XGETBV detection and the Linux AMX permission request. Compiled at
// baseline flags: it runs before we know what the CPU can do.
#include "kt_kernel/cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

namespace kt {
namespace {

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs{};
  return r;
}

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

bool bit(unsigned v, int b) { return (v >> b) & 1u; }

// Linux arch_prctl codes (asm/prctl.h); spelled out so that older headers build.
constexpr int kArchGetXcompPerm = 0x1022;
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

void request_amx_permission(CpuFeatures* f) {
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    f->amx_permission_error = std::string("arch_prctl(ARCH_REQ_XCOMP_PERM) failed: ") + std::strerror(errno);
    return;
  }
  unsigned long mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0) {
    f->amx_permission_error = std::string("arch_prctl(ARCH_GET_XCOMP_PERM) failed: ") + std::strerror(errno);
    return;
  }
  if (!(mask & (1ul << kXfeatureXtiledata))) {
    f->amx_permission_error = "the kernel did not grant XTILEDATA";
    return;
  }
  f->amx_permitted = true;
}

CpuFeatures detect() {
  CpuFeatures f;
  const Regs r0 = cpuid(0, 0);
  char vendor[13] = {};
  std::memcpy(vendor + 0, &r0.b, 4);
  std::memcpy(vendor + 4, &r0.d, 4);
  std::memcpy(vendor + 8, &r0.c, 4);
  f.vendor = vendor;
  const unsigned max_leaf = r0.a;

  if (cpuid(0x80000000u, 0).a >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const Regs r = cpuid(0x80000002u + i, 0);
      std::memcpy(brand + 16 * i + 0, &r.a, 4);
      std::memcpy(brand + 16 * i + 4, &r.b, 4);
      std::memcpy(brand + 16 * i + 8, &r.c, 4);
      std::memcpy(brand + 16 * i + 12, &r.d, 4);
    }
    f.brand = brand;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
  }

  const Regs r1 = cpuid(1, 0);
  f.sse42 = bit(r1.c, 20);
  const bool osxsave = bit(r1.c, 27);
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;             // SSE + AVX state
  const bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM_Hi256 + Hi16_ZMM
  const bool os_tile = (xcr0 & (3ull << 17)) == (3ull << 17);  // XTILECFG + XTILEDATA

  f.avx = os_ymm && bit(r1.c, 28);
  f.fma = f.avx && bit(r1.c, 12);
  f.f16c = f.avx && bit(r1.c, 29);
  if (max_leaf >= 7) {
    const Regs r7 = cpuid(7, 0);
    const Regs r71 = cpuid(7, 1);
    f.avx2 = f.avx && bit(r7.b, 5);
    f.bmi2 = bit(r7.b, 8);
    f.avx_vnni = f.avx2 && bit(r71.a, 4);
    f.avx512f = os_zmm && bit(r7.b, 16);
    f.avx512dq = f.avx512f && bit(r7.b, 17);
    f.avx512bw = f.avx512f && bit(r7.b, 30);
    f.avx512vl = f.avx512f && bit(r7.b, 31);
    f.avx512_vbmi = f.avx512f && bit(r7.c, 1);
    f.avx512_vnni = f.avx512f && bit(r7.c, 11);
    f.avx512_bf16 = f.avx512f && bit(r71.a, 5);
    f.amx_bf16 = os_tile && bit(r7.d, 22);
    f.amx_tile = os_tile && bit(r7.d, 24);
    f.amx_int8 = os_tile && bit(r7.d, 25);
  }
  if (f.amx_tile) request_amx_permission(&f);
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace kt
