// The CUDA runtime, loaded at run time (dlopen) and only when a caller hands
// us a stream: the library has no build-time CUDA dependency, and CPU-only use
// loads nothing. Only the handful of entry points that order CPU work on a
// stream are resolved (see DESIGN.md "Threads and async").
//
// KT_KERNEL_CUDART=/path/to/lib.so replaces the search (the tests substitute a
// stand-in runtime that runs copies and host functions on its own threads).
#pragma once

#include <cstddef>
#include <string>

namespace kt {

struct CudaRuntime {
  // Signatures of the CUDA runtime API with the handle types erased (a stream
  // is a pointer, an error is an int, cudaMemcpyKind an int).
  using HostFn = void (*)(void* user_data);
  int (*launch_host_func)(void* stream, HostFn fn, void* user_data) = nullptr;          // cudaLaunchHostFunc
  int (*memcpy_2d_async)(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                         int kind, void* stream) = nullptr;                                 // cudaMemcpy2DAsync
  int (*stream_synchronize)(void* stream) = nullptr;                                        // cudaStreamSynchronize
  int (*host_alloc)(void** ptr, size_t bytes, unsigned flags) = nullptr;                     // cudaHostAlloc
  int (*free_host)(void* ptr) = nullptr;                                                    // cudaFreeHost
  const char* (*get_error_string)(int err) = nullptr;                                       // cudaGetErrorString
  std::string path;  // the library that was loaded

  static constexpr int kMemcpyDefault = 4;  // cudaMemcpyDefault: direction from the pointers (UVA)

  // Throws std::runtime_error naming the call and the runtime's message if err != 0.
  void check(int err, const char* what) const;
};

// The runtime, loaded on first call. Throws std::runtime_error when no CUDA
// runtime can be loaded or an entry point is missing.
const CudaRuntime& cuda_runtime();

// True once cuda_runtime() has loaded a library in this process (for tests:
// CPU-only use must never load it).
bool cuda_runtime_loaded();

}  // namespace kt
