// Builds one complete kernel table per available backend, once, and decides
// which runs. Nothing else in the library tests the instruction set.
#include "kt_kernel/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "kt_kernel/cpu_features.h"

namespace kt {
namespace {

using Filler = void (*)(KernelTable*, const CpuFeatures&);

struct Backend {
  Backend(const char* n, Filler f, const char* fb) : name(n), fill(f), fallback(fb) {}
  const char* name;
  Filler fill;
  const char* fallback;  // where missing formats come from ("" = none)
  bool available = false;
  std::string reason;
  KernelTable table;
  const char* provider[kNumSchemes] = {};
};

bool table_has_any(const KernelTable& t) {
  for (const auto& f : t.formats)
    if (f.gate_up || f.down || f.prepare_acts) return true;
  return false;
}

std::string cpu_reason(const std::string& name, const CpuFeatures& c) {
  if (name == "amx") {
    if (!(c.amx_tile && c.amx_int8 && c.amx_bf16)) return "the CPU (or the OS) lacks AMX-TILE/AMX-INT8/AMX-BF16";
    if (!c.amx_permitted) return "the Linux AMX permission request failed: " + c.amx_permission_error;
    if (!c.has_avx512_backend()) return "the CPU lacks AVX-512 F/BW/VL/DQ/VNNI";
    return "";
  }
  if (name == "avx512") return c.has_avx512_backend() ? "" : "the CPU (or the OS) lacks AVX-512 F/BW/VL/DQ/VNNI";
  if (name == "avx2") return c.has_avx2_backend() ? "" : "the CPU (or the OS) lacks AVX2/FMA/F16C";
  return "";
}

class Registry {
 public:
  Registry() {
    const CpuFeatures& cpu = cpu_features();
    // Preference order; amx-emu last and never chosen automatically. The
    // emulation borrows only from scalar, so it runs on every CPU.
    backends_ = {
        {"amx", fill_kernels_amx, "avx512"},
        {"avx512", fill_kernels_avx512, "avx2"},
        {"avx2", fill_kernels_avx2, "scalar"},
        {"scalar", fill_kernels_scalar, ""},
        {"amx-emu", fill_kernels_amx_emu, "scalar"},
    };
    // Fill from the bottom of each chain up so that borrowing finds completed tables.
    for (const char* n : {"scalar", "avx2", "avx512", "amx", "amx-emu"}) {
      Backend& b = find(n);
      b.reason = cpu_reason(n, cpu);
      if (!b.reason.empty()) continue;
      b.table.name = b.name;
      b.fill(&b.table, cpu);
      if (!table_has_any(b.table)) {
        b.reason = "no kernels of this backend are compiled into this build";
        continue;
      }
      for (int s = 0; s < kNumSchemes; ++s) b.provider[s] = b.name;
      if (*b.fallback) {
        Backend& fb = find(b.fallback);
        // A fallback that is itself unavailable hands on to its own fallback.
        Backend* src = &fb;
        while (!src->available && *src->fallback) src = &find(src->fallback);
        for (int s = 0; s < kNumSchemes; ++s) {
          FormatKernels& f = b.table.formats[s];
          const FormatKernels& g = src->table.formats[s];
          if (!f.prepare_acts || !f.gate_up || !f.down) {
            f = g;
            b.provider[s] = src->provider[s];
          }
        }
        RowConvertKernels& c = b.table.convert;
        if (!c.bf16_to_f32) c.bf16_to_f32 = src->table.convert.bf16_to_f32;
        if (!c.f32_to_bf16) c.f32_to_bf16 = src->table.convert.f32_to_bf16;
      }
      b.available = true;
    }
  }

  Backend& find(const std::string& name) {
    for (auto& b : backends_)
      if (name == b.name) return b;
    std::string known;
    for (auto& b : backends_) known += std::string(known.empty() ? "" : ", ") + b.name;
    throw std::invalid_argument("unknown kt_kernel backend '" + name + "' (known: " + known + ")");
  }

  std::vector<Backend>& all() { return backends_; }

 private:
  std::vector<Backend> backends_;
};

Registry& registry() {
  static Registry r;
  return r;
}

std::string available_list() {
  std::string s;
  for (const auto& n : available_backends()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

std::mutex g_choice_mutex;
std::atomic<const KernelTable*> g_current{nullptr};
std::atomic<const char*> g_last_used{nullptr};

const KernelTable& choose_initial() {
  const char* env = std::getenv("KT_KERNEL_BACKEND");
  if (env && *env) {
    try {
      return backend_kernels(env);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("KT_KERNEL_BACKEND: ") + e.what());
    }
  }
  for (auto& b : registry().all())
    if (b.available && std::string(b.name) != "amx-emu") return b.table;
  throw std::logic_error("no kt_kernel backend available (the scalar one always should be)");
}

}  // namespace

std::vector<std::string> available_backends() {
  std::vector<std::string> out;
  for (auto& b : registry().all())
    if (b.available) out.push_back(b.name);
  return out;
}

std::vector<std::string> known_backends() {
  std::vector<std::string> out;
  for (auto& b : registry().all()) out.push_back(b.name);
  return out;
}

std::string backend_unavailable_reason(const std::string& name) { return registry().find(name).reason; }

const KernelTable& backend_kernels(const std::string& name) {
  Backend& b = registry().find(name);
  if (!b.available)
    throw std::invalid_argument("kt_kernel backend '" + name + "' is not available on this machine: " + b.reason +
                                " (available: " + available_list() + ")");
  return b.table;
}

const KernelTable& current_kernels() {
  const KernelTable* t = g_current.load(std::memory_order_acquire);
  if (t) return *t;
  std::lock_guard<std::mutex> lock(g_choice_mutex);
  t = g_current.load(std::memory_order_relaxed);
  if (!t) {
    t = &choose_initial();
    g_current.store(t, std::memory_order_release);
  }
  return *t;
}

void set_backend(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_choice_mutex);
  if (name.empty()) {
    for (auto& b : registry().all())
      if (b.available && std::string(b.name) != "amx-emu") {
        g_current.store(&b.table, std::memory_order_release);
        return;
      }
  }
  g_current.store(&backend_kernels(name), std::memory_order_release);
}

std::string last_used_backend() {
  const char* n = g_last_used.load(std::memory_order_relaxed);
  return n ? n : "";
}

void note_backend_used(const KernelTable& t) { g_last_used.store(t.name, std::memory_order_relaxed); }

std::string format_provider(const std::string& backend, QuantScheme s) {
  Backend& b = registry().find(backend);
  if (!b.available) return "";
  return b.provider[static_cast<int>(s)];
}

}  // namespace kt
