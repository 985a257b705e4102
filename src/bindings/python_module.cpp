// The extension module: thin by design. Python validates every argument
// (shapes, dtypes, strides, devices) and passes raw addresses; this file
// converts them to C++ calls, releases the GIL around the work, and turns C++
// exceptions into Python ones (invalid_argument -> ValueError,
// runtime_error -> RuntimeError, bad_alloc -> MemoryError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <string>
#include <memory>
#include <vector>

#include "kt_kernel/cpu_features.h"
#include "kt_kernel/dispatch.h"
#include "kt_kernel/moe_layer.h"
#include "gil_release.h"
#include "kt_kernel/pack.h"
#include "thread_pool.h"
#include "topology.h"

namespace py = pybind11;
using namespace kt;

namespace {

template <typename T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

QuantScheme to_scheme(int s) {
  if (s < 0 || s >= kNumSchemes) throw std::invalid_argument("unknown quantisation scheme code " + std::to_string(s));
  return static_cast<QuantScheme>(s);
}

DType to_dtype(int d) {
  if (d < 0 || d > 3) throw std::invalid_argument("unknown dtype code " + std::to_string(d));
  return static_cast<DType>(d);
}

// Most worker threads one pool takes: more than the hardware threads of the
// largest x86 servers, far fewer than would exhaust the process's threads.
constexpr int64_t kMaxPoolThreads = 4096;

// An integer argument of a native constructor, checked here rather than by
// pybind11's overload resolution, whose error for a bool, a float or an
// out-of-range value lists every signature without naming the argument.
// Accepts Python ints and objects with __index__ (NumPy integers); rejects
// bool (and numpy.bool, which has no __index__).
int64_t int_arg(py::handle v, const std::string& name, int64_t lo, int64_t hi) {
  if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
    throw py::type_error(name + ": expected an int, got " + std::string(py::str(py::type::of(v).attr("__name__"))));
  py::int_ i = py::reinterpret_steal<py::int_>(PyNumber_Index(v.ptr()));
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (overflow == 0 && x == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0 || x < lo || x > hi)
    throw py::value_error(name + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                          std::string(py::str(i)));
  return int64_t(x);
}

// NUMA node ids this process can run threads on, ascending.
std::vector<int> nodes_with_cpus() {
  std::vector<int> ids;
  for (const NumaNodeInfo& n : topology().nodes)
    if (!n.cpus.empty()) ids.push_back(n.os_index);
  return ids;
}

// The sub-pools' NUMA nodes: each an existing node with CPUs this process may
// use (a sub-pool on a missing node would run unpinned while claiming a node).
std::vector<int> numa_nodes_arg(py::handle v) {
  if (py::isinstance<py::str>(v) || py::isinstance<py::bytes>(v) || !py::isinstance<py::sequence>(v))
    throw py::type_error("numa_nodes: expected a list of ints, got " +
                         std::string(py::str(py::type::of(v).attr("__name__"))));
  const std::vector<int> available = nodes_with_cpus();
  std::vector<int> nodes;
  const py::sequence seq = py::reinterpret_borrow<py::sequence>(v);
  for (size_t k = 0; k < seq.size(); ++k) {
    const std::string name = "numa_nodes[" + std::to_string(k) + "]";
    const int node = int(int_arg(seq[k], name, 0, std::numeric_limits<int32_t>::max()));
    if (std::find(available.begin(), available.end(), node) == available.end()) {
      std::string list;
      for (int a : available) list += (list.empty() ? "" : ", ") + std::to_string(a);
      throw py::value_error(name + " = " + std::to_string(node) +
                            ": no such NUMA node with CPUs this process may use (available: " + list + ")");
    }
    nodes.push_back(node);
  }
  return nodes;
}

py::dict cpu_info() {
  const CpuFeatures& c = cpu_features();
  const Topology& t = topology();
  py::dict flags;
  flags["sse4_2"] = c.sse42;
  flags["avx"] = c.avx;
  flags["avx2"] = c.avx2;
  flags["fma"] = c.fma;
  flags["f16c"] = c.f16c;
  flags["bmi2"] = c.bmi2;
  flags["avx_vnni"] = c.avx_vnni;
  flags["avx512f"] = c.avx512f;
  flags["avx512bw"] = c.avx512bw;
  flags["avx512vl"] = c.avx512vl;
  flags["avx512dq"] = c.avx512dq;
  flags["avx512_vnni"] = c.avx512_vnni;
  flags["avx512_bf16"] = c.avx512_bf16;
  flags["avx512_vbmi"] = c.avx512_vbmi;
  flags["amx_tile"] = c.amx_tile;
  flags["amx_int8"] = c.amx_int8;
  flags["amx_bf16"] = c.amx_bf16;
  flags["amx_permitted"] = c.amx_permitted;
  py::list nodes;
  for (const auto& n : t.nodes) {
    py::dict d;
    d["node"] = n.os_index;
    d["cpus"] = n.cpus;
    d["memory_bytes"] = n.memory_bytes;
    nodes.append(d);
  }
  py::dict caches;
  caches["l1d"] = t.caches.l1d;
  caches["l2"] = t.caches.l2;
  caches["l3"] = t.caches.l3;
  py::dict out;
  out["vendor"] = c.vendor;
  out["brand"] = c.brand;
  out["flags"] = flags;
  out["amx_permission_error"] = c.amx_permission_error;
  out["cores"] = t.num_cores;
  out["logical_cpus"] = t.num_pus;
  out["numa_nodes"] = nodes;
  out["caches"] = caches;
  return out;
}

py::array_t<uint8_t> pack_to_array(int scheme, uint32_t group, py::array_t<float, py::array::c_style | py::array::forcecast> w) {
  if (w.ndim() != 2) throw std::invalid_argument("weights must be 2-D [rows, cols]");
  PackedGeometry g;
  if (!packed_geometry(to_scheme(scheme), uint32_t(w.shape(0)), uint32_t(w.shape(1)), group, &g))
    throw std::invalid_argument("invalid geometry for this format (empty matrix, or group size not dividing cols)");
  py::array_t<uint8_t> out{py::ssize_t(g.total_bytes)};
  {
    GilRelease nogil;
    pack_matrix(to_scheme(scheme), g, w.data(), DType::kF32, g.cols, out.mutable_data());
  }
  return out;
}

py::array_t<double> unpack_from_array(int scheme, uint32_t group, uint32_t rows, uint32_t cols,
                                      py::array_t<uint8_t, py::array::c_style> packed) {
  PackedGeometry g;
  if (!packed_geometry(to_scheme(scheme), rows, cols, group, &g)) throw std::invalid_argument("invalid geometry");
  if (size_t(packed.size()) != g.total_bytes)
    throw std::invalid_argument("packed buffer has " + std::to_string(packed.size()) + " bytes, expected " +
                                std::to_string(g.total_bytes));
  py::array_t<double> out({py::ssize_t(rows), py::ssize_t(cols)});
  unpack_matrix(to_scheme(scheme), g, packed.data(), out.mutable_data());
  return out;
}

py::dict geometry(int scheme, uint32_t rows, uint32_t cols, uint32_t group) {
  PackedGeometry g;
  if (!packed_geometry(to_scheme(scheme), rows, cols, group, &g)) throw std::invalid_argument("invalid geometry");
  py::dict d;
  d["rows_padded"] = g.rows_padded;
  d["cols_padded"] = g.cols_padded;
  d["group_size"] = g.group_size;
  d["groups"] = g.groups;
  d["total_bytes"] = g.total_bytes;
  return d;
}

// Encodes fp32 activation rows with a backend's prepare_acts (for tests of
// the quantiser against its numpy replica).
py::tuple prepare_acts(const std::string& backend, int scheme, py::array_t<float, py::array::c_style | py::array::forcecast> x) {
  if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D");
  const QuantScheme s = to_scheme(scheme);
  const size_t rows = size_t(x.shape(0)), k = size_t(x.shape(1));
  const FormatKernels& fk = kernels_for(backend_kernels(backend), s);
  const size_t rb = acts_row_bytes(s, k), gs = acts_group_sums_per_row(s, k);
  py::array_t<uint8_t> data({py::ssize_t(rows), py::ssize_t(rb)});
  py::array_t<float> scale{py::ssize_t(rows)};
  py::array_t<int32_t> sums({py::ssize_t(rows), py::ssize_t(gs)});
  ActsBuffer b;
  b.data = data.mutable_data();
  b.row_bytes = rb;
  b.row_scale = scale.mutable_data();
  b.group_sums = sums.mutable_data();
  b.group_sums_stride = gs;
  fk.prepare_acts(x.data(), rows, k, k, b);
  return py::make_tuple(data, scale, sums);
}

// Canonical quantised form of w (pack.h): (codes, scales, mins or None).
py::tuple quantize_to_arrays(int scheme, uint32_t group, py::array_t<float, py::array::c_style | py::array::forcecast> w,
                             bool search) {
  if (w.ndim() != 2) throw std::invalid_argument("weights must be 2-D [rows, cols]");
  const QuantScheme s = to_scheme(scheme);
  const size_t rows = size_t(w.shape(0)), cols = size_t(w.shape(1));
  const size_t sc = quantized_scale_cols(s, group, cols);
  py::array q = s == QuantScheme::kBF16 ? py::array(py::array_t<uint16_t>({py::ssize_t(rows), py::ssize_t(cols)}))
                : scheme_is_int8(s) ? py::array(py::array_t<int8_t>({py::ssize_t(rows), py::ssize_t(cols)}))
                : s == QuantScheme::kFP8Block ? py::array(py::array_t<uint8_t>({py::ssize_t(rows), py::ssize_t(cols)}))
                : py::array(py::array_t<uint8_t>({py::ssize_t(rows), py::ssize_t(cols / 2)}));
  py::array_t<float> scales({py::ssize_t(rows), py::ssize_t(sc)});
  py::object mins = py::none();
  float* mins_ptr = nullptr;
  if (s == QuantScheme::kInt4Asym) {
    py::array_t<float> m({py::ssize_t(rows), py::ssize_t(sc)});
    mins_ptr = m.mutable_data();
    mins = m;
  }
  void* qp = q.mutable_data();
  float* sp = scales.mutable_data();
  {
    GilRelease nogil;
    quantize_matrix(s, group, w.data(), rows, cols, cols, search, qp, sp, mins_ptr);
  }
  return py::make_tuple(q, s == QuantScheme::kBF16 ? py::object(py::none()) : py::object(scales), mins);
}

// Packs a canonical quantised matrix (contiguous arrays) into layout v1,
// columns [col0, col0 + cols) of it.
py::array_t<uint8_t> pack_quantized_to_array(int scheme, uint32_t group, uint32_t rows, uint32_t cols, py::array q,
                                             py::object scales, py::object mins, uint32_t col0) {
  const QuantScheme s = to_scheme(scheme);
  PackedGeometry g;
  if (!packed_geometry(s, rows, cols, group, &g)) throw std::invalid_argument("invalid geometry");
  if (!(q.flags() & py::array::c_style) || q.ndim() != 2 || size_t(q.shape(0)) != rows)
    throw std::invalid_argument("codes must be a C-contiguous 2-D array with `rows` rows");
  const size_t ld_q = size_t(q.shape(1));
  const size_t full_cols = scheme_is_int4(s) ? ld_q * 2 : ld_q;
  if (size_t(col0) + cols > full_cols) throw std::invalid_argument("col0 + cols exceeds the codes' columns");
  if (size_t(q.itemsize()) != (s == QuantScheme::kBF16 ? 2u : 1u)) throw std::invalid_argument("codes have the wrong item size");
  py::array_t<float, py::array::c_style | py::array::forcecast> sc, mn;
  size_t sld = 0;
  if (s != QuantScheme::kBF16) {
    sc = py::array_t<float, py::array::c_style | py::array::forcecast>(scales);
    if (sc.ndim() != 2 || size_t(sc.shape(0)) != rows || size_t(sc.shape(1)) != quantized_scale_cols(s, group, full_cols))
      throw std::invalid_argument("scales have the wrong shape");
    sld = size_t(sc.shape(1));
  }
  if (s == QuantScheme::kInt4Asym) {
    mn = py::array_t<float, py::array::c_style | py::array::forcecast>(mins);
    if (mn.ndim() != 2 || mn.shape(0) != sc.shape(0) || mn.shape(1) != sc.shape(1))
      throw std::invalid_argument("mins have the wrong shape");
  }
  py::array_t<uint8_t> out{py::ssize_t(g.total_bytes)};
  pack_quantized_blocks(s, g, q.data(), ld_q, sc ? sc.data() : nullptr, mn ? mn.data() : nullptr, sld,
                        out.mutable_data(), 0, g.rows_padded / kRowBlock, col0);
  return out;
}

MoeLayer::QuantizedMatrix quantized_ref(const std::vector<uintptr_t>& a) {
  // (codes address, ld_q, scales address, mins address, scales_ld), validated by the caller.
  if (a.size() != 5) throw std::invalid_argument("a quantised matrix is (q, ld_q, scales, mins, scales_ld)");
  MoeLayer::QuantizedMatrix m;
  m.q = ptr<void>(a[0]);
  m.ld_q = size_t(a[1]);
  m.scales = a[2] ? ptr<float>(a[2]) : nullptr;
  m.mins = a[3] ? ptr<float>(a[3]) : nullptr;
  m.scales_ld = size_t(a[4]);
  return m;
}

struct PyMoe {
  std::shared_ptr<ThreadPool> pool;  // keeps the pool alive as long as a layer uses it
  std::unique_ptr<MoeLayer> layer;
};

}  // namespace

void register_async_bindings(py::module_& m);  // async_module.cpp

PYBIND11_MODULE(_kt_kernel, m) {
  m.doc() = "kt_kernel native module (use the kt_kernel package, not this module)";
  m.attr("PACKED_LAYOUT_VERSION") = kPackedLayoutVersion;
  {
    // The native limits, so that Python checks the same bounds before it
    // allocates anything sized by them (a mask of num_experts entries).
    py::dict limits;
    limits["max_experts"] = kMaxExperts;
    limits["max_top_k"] = kMaxTopK;
    limits["max_matrix_elements"] = kMaxMatrixElements;
    limits["max_threads"] = kMaxPoolThreads;
    m.attr("LIMITS") = limits;
  }
  py_calls::install_fork_handlers();
  m.def("_prepare_exit", &py_calls::prepare_for_exit, py::arg("timeout_s"),
        "Interpreter exit (kt_kernel registers it with atexit): parks other threads as they enter or leave the "
        "library, waits up to timeout_s for calls in progress and queued layer work; True if all finished");
  m.def("_fork_generation", &fork_generation, "0 in a process that was not forked, +1 per fork (tests)");
  m.def(
      "phase_times",
      [](bool reset) {
        LayerPhaseTimes t;
        {
          GilRelease nogil;  // waits for a running layer
          t = layer_phase_times(reset);
        }
        static const char* names[kNumPhases] = {"routing", "encode_x", "gate_up", "encode_h", "down", "combine"};
        py::dict d;
        for (int i = 0; i < kNumPhases; ++i) d[names[i]] = t.seconds[i];
        d["passes"] = t.passes;
        return d;
      },
      py::arg("reset") = false,
      "Seconds spent in each step of the layer passes run so far (all layers), and the pass count");
  m.def("cpu_info", &cpu_info);
  m.def("backends", &available_backends);
  m.def("known_backends", &known_backends);
  m.def("backend_unavailable_reason", &backend_unavailable_reason);
  m.def("set_backend", &set_backend);
  m.def("current_backend", [] { return std::string(current_kernels().name); });
  m.def("last_used_backend", &last_used_backend);
  m.def("format_provider", [](const std::string& b, int s) { return format_provider(b, to_scheme(s)); });
  m.def("pack_matrix", &pack_to_array);
  m.def("unpack_matrix", &unpack_from_array);
  m.def("packed_geometry", &geometry);
  m.def("prepare_acts", &prepare_acts);
  m.def("quantize_matrix", &quantize_to_arrays, py::arg("scheme"), py::arg("group_size"), py::arg("w"),
        py::arg("search") = false);
  m.def("pack_quantized", &pack_quantized_to_array, py::arg("scheme"), py::arg("group_size"), py::arg("rows"),
        py::arg("cols"), py::arg("q"), py::arg("scales"), py::arg("mins"), py::arg("col0") = 0);

  py::class_<ThreadPool, std::shared_ptr<ThreadPool>>(m, "ThreadPool")
      .def(py::init([](py::object threads_arg, py::object nodes_arg, bool pin) {
             const int threads = int(int_arg(threads_arg, "cpuinfer_threads", 1, kMaxPoolThreads));
             const std::vector<int> nodes = numa_nodes_arg(nodes_arg);
             if (nodes.empty()) throw std::invalid_argument("numa_nodes: need at least one sub-pool");
             if (int(nodes.size()) > threads)
               throw std::invalid_argument("threadpool_count (" + std::to_string(nodes.size()) +
                                           ") exceeds cpuinfer_threads (" + std::to_string(threads) + ")");
             return std::make_shared<ThreadPool>(threads, nodes, pin);
           }),
           py::arg("threads"), py::arg("numa_nodes"), py::arg("pin"))
      .def_property_readonly("num_threads", &ThreadPool::num_threads)
      .def_property_readonly("num_subpools", &ThreadPool::num_subpools)
      .def_property_readonly("numa_nodes", &ThreadPool::subpool_numa_nodes)
      .def_property_readonly("live_workers", &ThreadPool::live_workers,
                             "Worker threads running in this process (0 in a forked child until its first job)")
      .def_property(
          "worker_spin_us", [](const ThreadPool& p) { return double(p.worker_spin().count()) / 1e3; },
          [](ThreadPool& p, double us) {
            if (!(us >= 0 && us <= 3.6e9)) throw py::value_error("worker_spin_us: expected 0 to 3.6e9 microseconds");
            p.set_worker_spin(std::chrono::nanoseconds(int64_t(us * 1e3)));
          },
          "How long idle workers spin after a job before they sleep (default KT_KERNEL_SPIN_US, else 2000)")
      .def("wake", &ThreadPool::wake, "Gets sleeping workers spinning ahead of a job (a layer call about to start)")
      .def("run_empty_jobs", [](ThreadPool& p, size_t n) {
        // Dispatch-latency probe for the bench: n empty jobs of one task per thread.
        GilRelease nogil;
        for (size_t i = 0; i < n; ++i) p.parallel_for(size_t(p.num_threads()), [](size_t, int) {});
      });

  py::class_<PyMoe>(m, "MoeLayer")
      .def(py::init([](std::shared_ptr<ThreadPool> pool, py::object E, py::object k, py::object H, py::object I,
                       py::object scheme, py::object group, float limit, float alpha) {
             if (!pool) throw py::type_error("pool: expected a ThreadPool, got None");
             constexpr int64_t u32 = std::numeric_limits<uint32_t>::max();
             MoeConfig c;
             // The layer checks the sizes against its own limits (moe_layer.h);
             // here they only have to be integers of its field types.
             c.num_experts = uint32_t(int_arg(E, "num_experts", 1, u32));
             c.top_k = uint32_t(int_arg(k, "num_experts_per_tok", 1, u32));
             c.hidden = uint32_t(int_arg(H, "hidden_size", 1, u32));
             c.intermediate = uint32_t(int_arg(I, "moe_intermediate_size", 1, u32));
             c.scheme = to_scheme(int(int_arg(scheme, "scheme", 0, kNumSchemes - 1)));
             c.group_size = uint32_t(int_arg(group, "group_size", 0, u32));
             c.activation.swiglu_limit = limit;
             c.activation.swiglu_alpha = alpha;
             auto p = std::make_unique<PyMoe>();
             p->pool = pool;
             p->layer = std::make_unique<MoeLayer>(c, *pool);
             return p;
           }),
           py::arg("pool"), py::arg("num_experts"), py::arg("top_k"), py::arg("hidden"), py::arg("intermediate"),
           py::arg("scheme"), py::arg("group_size"), py::arg("swiglu_limit"), py::arg("swiglu_alpha"))
      .def("load_dense",
           [](PyMoe& self, uintptr_t gate, uintptr_t up, uintptr_t down, int dtype, uint32_t num_logical,
              uintptr_t map, uintptr_t load_mask) {
             GilRelease nogil;
             self.layer->load_dense(ptr<void>(gate), ptr<void>(up), ptr<void>(down), to_dtype(dtype), num_logical,
                                    map ? ptr<int64_t>(map) : nullptr, load_mask ? ptr<uint8_t>(load_mask) : nullptr);
           })
      .def("forward",
           [](PyMoe& self, size_t tokens, uintptr_t x, int x_dtype, size_t x_stride, uintptr_t ids, bool ids_int64,
              size_t ids_stride, uintptr_t w, int w_dtype, size_t w_stride, uintptr_t mask, uintptr_t y, int y_dtype,
              size_t y_stride) {
             MoeForwardArgs a;
             a.tokens = tokens;
             a.x = ptr<void>(x);
             a.x_dtype = to_dtype(x_dtype);
             a.x_stride = x_stride;
             a.ids = ptr<void>(ids);
             a.ids_int64 = ids_int64;
             a.ids_stride = ids_stride;
             a.weights = ptr<void>(w);
             a.weights_dtype = to_dtype(w_dtype);
             a.weights_stride = w_stride;
             a.skip_mask = mask ? ptr<uint8_t>(mask) : nullptr;
             a.y = reinterpret_cast<void*>(y);
             a.y_dtype = to_dtype(y_dtype);
             a.y_stride = y_stride;
             GilRelease nogil;
             self.layer->forward(a);
           })
      .def("allocate",
           [](PyMoe& self) {
             GilRelease nogil;
             self.layer->allocate();
           })
      .def("load_expert_quantized",
           [](PyMoe& self, uint32_t slot, std::vector<uintptr_t> gate, std::vector<uintptr_t> up,
              std::vector<uintptr_t> down) {
             const auto g = quantized_ref(gate), u = quantized_ref(up), d = quantized_ref(down);
             GilRelease nogil;
             self.layer->load_expert_quantized(slot, g, u, d);
           })
      .def("load_expert_dense",
           [](PyMoe& self, uint32_t slot, uintptr_t gate, uintptr_t up, uintptr_t down, int dtype) {
             const DType dt = to_dtype(dtype);
             GilRelease nogil;
             self.layer->load_expert_dense(slot, ptr<void>(gate), ptr<void>(up), ptr<void>(down), dt);
           })
      .def("slot_loaded", [](PyMoe& self, uint32_t s) { return self.layer->slot_loaded(s); })
      .def_property_readonly("packed_bytes", [](PyMoe& self) { return self.layer->packed_bytes(); })
      .def("unpack_expert",
           [](PyMoe& self, uint32_t slot, int which) {
             const MoeConfig& c = self.layer->config();
             const size_t r = which == 2 ? c.hidden : c.intermediate, k = which == 2 ? c.intermediate : c.hidden;
             py::array_t<double> out({py::ssize_t(r), py::ssize_t(k)});
             self.layer->unpack_expert(slot, which, out.mutable_data());
             return out;
           })
      .def("set_capture", [](PyMoe& self, bool on) { self.layer->set_capture(on); })
      .def("captured_intermediate",
           [](PyMoe& self) {
             const auto& v = self.layer->captured_intermediate();
             const size_t I = self.layer->config().intermediate;
             py::array_t<float> out({py::ssize_t(I ? v.size() / I : 0), py::ssize_t(I)});
             if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(float));
             return out;
           })
      .def_property_readonly("num_slices", [](PyMoe& self) { return self.layer->num_slices(); })
      .def("slice_range", [](PyMoe& self, int s) { return self.layer->slice_range(s); })
      .def_property_readonly("address", [](PyMoe& self) { return reinterpret_cast<uintptr_t>(self.layer.get()); });
  register_async_bindings(m);
}
