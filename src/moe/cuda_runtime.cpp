#include "moe/cuda_runtime.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace kt {
namespace {

std::once_flag g_once;
CudaRuntime g_rt;
std::string g_error;
bool g_loaded = false;

template <typename F>
bool resolve(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

void load() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("KT_KERNEL_CUDART"); env && *env) {
    candidates.push_back(env);
  } else {
    // The soname PyTorch's CUDA wheels already loaded comes first, so the
    // process keeps one runtime.
    candidates = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};
  }
  void* lib = nullptr;
  std::string tried;
  for (const auto& c : candidates) {
    lib = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib) {
      g_rt.path = c;
      break;
    }
    const char* e = dlerror();
    tried += "\n  " + c + ": " + (e ? e : "not found");
  }
  if (!lib) {
    g_error = "a CUDA stream was given but no CUDA runtime library could be loaded (set KT_KERNEL_CUDART to its path):" +
              tried;
    return;
  }
  bool ok = resolve(lib, "cudaLaunchHostFunc", &g_rt.launch_host_func) &&
            resolve(lib, "cudaMemcpy2DAsync", &g_rt.memcpy_2d_async) &&
            resolve(lib, "cudaStreamSynchronize", &g_rt.stream_synchronize) &&
            resolve(lib, "cudaHostAlloc", &g_rt.host_alloc) && resolve(lib, "cudaFreeHost", &g_rt.free_host) &&
            resolve(lib, "cudaGetErrorString", &g_rt.get_error_string);
  if (!ok) {
    g_error = "the CUDA runtime " + g_rt.path + " lacks an entry point kt_kernel needs (cudaLaunchHostFunc, "
              "cudaMemcpy2DAsync, cudaStreamSynchronize, cudaHostAlloc, cudaFreeHost, cudaGetErrorString)";
    return;
  }
  g_loaded = true;  // the library stays loaded for the life of the process
}

}  // namespace

void CudaRuntime::check(int err, const char* what) const {
  if (err == 0) return;
  const char* msg = get_error_string ? get_error_string(err) : nullptr;
  throw std::runtime_error(std::string(what) + " failed: " + (msg ? msg : "error " + std::to_string(err)));
}

const CudaRuntime& cuda_runtime() {
  std::call_once(g_once, load);
  if (!g_loaded) throw std::runtime_error(g_error);
  return g_rt;
}

bool cuda_runtime_loaded() { return g_loaded; }

}  // namespace kt
