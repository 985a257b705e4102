// The one dispatch point: which backends exist here, which one runs.
//
// Available = compiled in AND the CPU has the instructions AND the OS allows
// them (for AMX: the permission request succeeded). Preference order is
// amx, avx512, avx2, scalar; "amx-emu" (AMX kernels over the software tile
// emulation) is available everywhere but only ever chosen explicitly.
// KT_KERNEL_BACKEND=<name> in the environment, or set_backend(), forces one.
#pragma once

#include <string>
#include <vector>

#include "kt_kernel/kernel_table.h"

namespace kt {

// Names of the available backends, in preference order ("amx-emu" last).
std::vector<std::string> available_backends();

// Every backend name the library knows, available or not.
std::vector<std::string> known_backends();

// Why a known backend is unavailable here ("" if it is available).
std::string backend_unavailable_reason(const std::string& name);

// The table of a named backend; throws std::invalid_argument naming the
// backend and the reason when it is unknown or unavailable.
const KernelTable& backend_kernels(const std::string& name);

// The table that runs now: the forced backend if any (set_backend, else
// KT_KERNEL_BACKEND read once), else the first available. Throws
// std::invalid_argument when the forced backend is unavailable.
const KernelTable& current_kernels();

// Forces a backend for subsequent calls ("" returns to automatic choice).
// Throws std::invalid_argument (and changes nothing) if unavailable.
void set_backend(const std::string& name);

// The backend whose kernels ran in the most recent layer call ("" if none yet).
std::string last_used_backend();
void note_backend_used(const KernelTable& t);

// Which backend provides each format's kernels in a backend's completed table
// (a backend may borrow formats it does not implement from the next one).
std::string format_provider(const std::string& backend, QuantScheme s);

}  // namespace kt
