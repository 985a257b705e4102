// Bindings of the async path (submit / sync, CUDA stream ordering) and the
// demo's bandwidth probe, kept apart from python_module.cpp. Thin like it: Python validates shapes, dtypes and
// devices and passes addresses; the GIL is released around anything that can
// wait.
#include <pybind11/pybind11.h>

#include <memory>

#include "bandwidth_probe.h"
#include "gil_release.h"
#include "kt_kernel/moe_layer.h"
#include "moe/async_layer.h"
#include "moe/cuda_runtime.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace kt;

namespace {

DType dtype_code(int d) {
  if (d < 0 || d > 3) throw std::invalid_argument("unknown dtype code " + std::to_string(d));
  return static_cast<DType>(d);
}

template <typename T>
T* addr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Holds the Python MoeLayer object so the C++ layer outlives this queue.
struct PyAsync {
  py::object owner;
  std::unique_ptr<AsyncLayer> async;
  ~PyAsync() {
    GilRelease nogil;  // draining may wait for queued work
    async.reset();
  }
};

AsyncSubmitArgs submit_args(size_t tokens, uintptr_t x, int x_dtype, size_t x_stride, uintptr_t ids, bool ids_int64,
                            size_t ids_stride, uintptr_t w, int w_dtype, size_t w_stride, uintptr_t mask, uintptr_t y,
                            int y_dtype, size_t y_stride, uint32_t deferred, uintptr_t counts, bool persistent,
                            bool use_stream, uintptr_t stream, uintptr_t tokens_device, bool run_inline) {
  AsyncSubmitArgs a;
  a.tokens = tokens;
  a.x = addr<const void>(x);
  a.x_dtype = dtype_code(x_dtype);
  a.x_stride = x_stride;
  a.ids = addr<const void>(ids);
  a.ids_int64 = ids_int64;
  a.ids_stride = ids_stride;
  a.weights = addr<const void>(w);
  a.weights_dtype = dtype_code(w_dtype);
  a.weights_stride = w_stride;
  a.skip_mask = mask ? addr<const uint8_t>(mask) : nullptr;
  a.y = addr<void>(y);
  a.y_dtype = dtype_code(y_dtype);
  a.y_stride = y_stride;
  a.deferred_per_token = deferred;
  a.expert_counts = counts ? addr<int64_t>(counts) : nullptr;
  a.persistent = persistent;
  a.use_stream = use_stream;
  a.stream = addr<void>(stream);
  a.tokens_device = tokens_device ? addr<const void>(tokens_device) : nullptr;
  a.run_inline = run_inline;
  return a;
}

}  // namespace

void register_async_bindings(py::module_& m) {
  m.def(
      "measure_read_bandwidth",
      [](std::shared_ptr<ThreadPool> pool, size_t bytes, int reps) {
        GilRelease nogil;
        return measure_read_bandwidth(*pool, bytes, reps);
      },
      py::arg("pool"), py::arg("bytes"), py::arg("reps"), "GB/s reading a buffer on all pool threads (demo probe)");
  m.def("release_async_staging", [] {
    GilRelease nogil;
    AsyncLayer::release_shared_staging();
  }, "Drops the process-wide staging sets (after every layer's clear_persistent)");
  m.def("cuda_runtime_loaded", &cuda_runtime_loaded, "True once a CUDA runtime was loaded (a stream was used)");
  m.def("cuda_runtime_path", [] { return cuda_runtime().path; }, "Loads the CUDA runtime (if not yet) and names it");

  py::class_<PyAsync>(m, "AsyncLayer")
      .def(py::init([](py::object owner, int layer_idx) {
             // The native layer is reached through its Python owner, which this object keeps alive
             // until every queued task of it has drained (~PyAsync).
             const uintptr_t layer_address = owner.attr("address").cast<uintptr_t>();
             auto p = std::make_unique<PyAsync>();
             p->owner = owner;
             p->async = std::make_unique<AsyncLayer>(*addr<MoeLayer>(layer_address), layer_idx);
             return p;
           }),
           py::arg("owner"), py::arg("layer_idx"))
      .def("submit",
           [](PyAsync& self, size_t tokens, uintptr_t x, int x_dtype, size_t x_stride, uintptr_t ids, bool ids_int64,
              size_t ids_stride, uintptr_t w, int w_dtype, size_t w_stride, uintptr_t mask, uintptr_t y, int y_dtype,
              size_t y_stride, uint32_t deferred, uintptr_t counts, bool persistent, bool use_stream, uintptr_t stream,
              uintptr_t tokens_device, bool run_inline) {
             const AsyncSubmitArgs a = submit_args(tokens, x, x_dtype, x_stride, ids, ids_int64, ids_stride, w, w_dtype,
                                                   w_stride, mask, y, y_dtype, y_stride, deferred, counts, persistent,
                                                   use_stream, stream, tokens_device, run_inline);
             GilRelease nogil;
             self.async->submit(a);
           },
           py::arg("tokens"), py::arg("x"), py::arg("x_dtype"), py::arg("x_stride"), py::arg("ids"),
           py::arg("ids_int64"), py::arg("ids_stride"), py::arg("w"), py::arg("w_dtype"), py::arg("w_stride"),
           py::arg("mask"), py::arg("y"), py::arg("y_dtype"), py::arg("y_stride"), py::arg("deferred"),
           py::arg("counts"), py::arg("persistent"), py::arg("use_stream"), py::arg("stream"),
           py::arg("tokens_device"), py::arg("run_inline") = false)
      .def("forward",
           [](PyAsync& self, size_t tokens, uintptr_t x, int x_dtype, size_t x_stride, uintptr_t ids, bool ids_int64,
              size_t ids_stride, uintptr_t w, int w_dtype, size_t w_stride, uintptr_t mask, uintptr_t y, int y_dtype,
              size_t y_stride, uint32_t deferred, uintptr_t counts, bool persistent, bool use_stream, uintptr_t stream,
              uintptr_t tokens_device, bool run_inline, uintptr_t y_out, size_t y_out_stride) {
             const AsyncSubmitArgs a = submit_args(tokens, x, x_dtype, x_stride, ids, ids_int64, ids_stride, w, w_dtype,
                                                   w_stride, mask, y, y_dtype, y_stride, deferred, counts, persistent,
                                                   use_stream, stream, tokens_device, run_inline);
             GilRelease nogil;
             self.async->forward(a, addr<void>(y_out), y_out_stride);
           },
           "submit then sync in one call (the submit's arguments, then sync's y and y_stride)")
      .def("sync",
           [](PyAsync& self, uintptr_t y, size_t y_stride) {
             GilRelease nogil;
             self.async->sync(addr<void>(y), y_stride);
           },
           py::arg("y"), py::arg("y_stride"))
      .def("drain",
           [](PyAsync& self) {
             GilRelease nogil;
             self.async->drain();
           },
           "Waits for all of this layer's queued, running or stream-pending work (raises if a submit is pending)")
      .def("wait_idle",
           [](PyAsync& self) {
             GilRelease nogil;
             self.async->wait_idle();
           },
           "Waits for all of this layer's work, a submit pending or not (its owner is going away)")
      .def_property_readonly("pending", [](PyAsync& self) { return self.async->pending(); })
      .def_property_readonly("num_slots", [](PyAsync& self) { return self.async->num_slots(); })
      .def_static("num_staging_sets", &AsyncLayer::num_staging_sets)
      .def("clear_persistent", [](PyAsync& self) {
        GilRelease nogil;
        self.async->clear_persistent();
      });
}
