// Registers the AMX kernels. This folder is compiled twice: with AMX flags
// (backend "amx") and at baseline flags over the tile emulation
// (KT_AMX_EMULATE, backend "amx-emu"); each build exports its own filler.
#include "kt_kernel/cpu_features.h"
#include "kt_kernel/kernel_table.h"

namespace kt {

#ifdef KT_AMX_EMULATE
void fill_kernels_amx_emu(KernelTable* t, const CpuFeatures& cpu) {}
#else
void fill_kernels_amx(KernelTable* t, const CpuFeatures& cpu) {}
#endif

}  // namespace kt
