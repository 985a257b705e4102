// What the CPU and the operating system let us execute, detected once.
#pragma once

#include <string>

namespace kt {

struct CpuFeatures {
  std::string vendor;  // "GenuineIntel", "AuthenticAMD", ...
  std::string brand;   // processor brand string
  // Each flag is true only if CPUID reports the instructions AND the OS
  // saves the register state they use (XGETBV).
  bool sse42 = false, avx = false, avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx_vnni = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx512_vbmi = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;  // CPUID + OS tile state
  // AMX tile data needs a per-process permission on Linux
  // (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); true only if that
  // call succeeded and the granted mask was read back.
  bool amx_permitted = false;
  std::string amx_permission_error;  // why not, when CPUID has AMX but permission failed

  bool has_avx512_backend() const { return avx512f && avx512bw && avx512vl && avx512dq && avx512_vnni; }
  bool has_avx2_backend() const { return avx2 && fma && f16c; }
  bool has_amx_backend() const { return has_avx512_backend() && amx_tile && amx_int8 && amx_bf16 && amx_permitted; }
};

// Detected on first call (thread-safe); the AMX permission request is made
// then, once per process.
const CpuFeatures& cpu_features();

}  // namespace kt
