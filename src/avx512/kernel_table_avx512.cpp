// Registers this folder's kernels in the dispatch table.
#include "kt_kernel/cpu_features.h"
#include "kt_kernel/kernel_table.h"

namespace kt {

void fill_kernels_avx512(KernelTable* t, const CpuFeatures& cpu) {}

}  // namespace kt
