// hwloc discovery behind topology.h. hwloc is used once, at first call, and
// its topology object is then released: what the library needs afterwards
// (each node's cores, as lists of OS CPU ids) is copied into plain vectors,
// and pinning goes through pthread_setaffinity_np with those ids.
#include "topology.h"

#include <hwloc.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

namespace kt {
namespace {

// Topology plus what pinning needs: per node (same order as topo.nodes),
// per core, the OS ids of the core's hardware threads on that node.
struct Discovered {
  Topology topo;
  std::vector<std::vector<std::vector<int>>> node_cores;
};

std::vector<int> bitmap_to_ids(hwloc_const_bitmap_t set) {
  std::vector<int> ids;
  if (set == nullptr) return ids;
  unsigned id;
  hwloc_bitmap_foreach_begin(id, set) { ids.push_back(int(id)); }
  hwloc_bitmap_foreach_end();
  return ids;
}

// CPUs this process may run on, from the kernel (used when hwloc fails).
std::vector<int> affinity_cpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  if (cpus.empty()) {
    unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned c = 0; c < n; ++c) cpus.push_back(int(c));
  }
  return cpus;
}

uint64_t physical_memory_bytes() {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page_size = sysconf(_SC_PAGE_SIZE);
  return (pages > 0 && page_size > 0) ? uint64_t(pages) * uint64_t(page_size) : 0;
}

size_t sysconf_size(int name) {
  long v = sysconf(name);
  return v > 0 ? size_t(v) : 0;
}

// One node 0 with the given CPUs, each CPU counted as a core.
void describe_as_single_node(Discovered& d, std::vector<int> cpus) {
  d.topo.nodes.clear();
  d.node_cores.clear();
  std::vector<std::vector<int>> cores;
  for (int c : cpus) cores.push_back({c});
  d.topo.nodes.push_back(NumaNodeInfo{0, std::move(cpus), physical_memory_bytes()});
  d.node_cores.push_back(std::move(cores));
}

// glibc's per-core cache sizes, for what hwloc did not report. Not L3:
// glibc's L3 figure is a per-package total on some CPUs, not the size of one
// instance, so an unknown L3 stays 0.
void fill_missing_caches(CacheSizes& c) {
#ifdef _SC_LEVEL1_DCACHE_SIZE
  if (c.l1d == 0) c.l1d = sysconf_size(_SC_LEVEL1_DCACHE_SIZE);
  if (c.l2 == 0) c.l2 = sysconf_size(_SC_LEVEL2_CACHE_SIZE);
#endif
}

size_t first_cache_size(hwloc_topology_t t, hwloc_obj_type_t type) {
  hwloc_obj_t obj = hwloc_get_obj_by_type(t, type, 0);
  return (obj != nullptr && obj->attr != nullptr) ? size_t(obj->attr->cache.size) : 0;
}

// Fills d from hwloc; returns false if hwloc could not load a topology.
bool discover_with_hwloc(Discovered& d) {
  hwloc_topology_t t;
  if (hwloc_topology_init(&t) != 0) return false;
  if (hwloc_topology_load(t) != 0) {
    hwloc_topology_destroy(t);
    return false;
  }

  const int num_pus = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PU);
  const int num_cores = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_CORE);
  d.topo.num_pus = std::max(1, num_pus);
  d.topo.num_cores = std::max(1, num_cores > 0 ? num_cores : num_pus);

  d.topo.caches.l1d = first_cache_size(t, HWLOC_OBJ_L1CACHE);
  d.topo.caches.l2 = first_cache_size(t, HWLOC_OBJ_L2CACHE);
  d.topo.caches.l3 = first_cache_size(t, HWLOC_OBJ_L3CACHE);

  hwloc_const_cpuset_t usable = hwloc_topology_get_topology_cpuset(t);
  hwloc_bitmap_t node_set = hwloc_bitmap_alloc();
  hwloc_bitmap_t core_set = hwloc_bitmap_alloc();
  const int num_nodes = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
  struct Entry {
    NumaNodeInfo info;
    std::vector<std::vector<int>> cores;
  };
  std::vector<Entry> entries;
  for (int i = 0; i < num_nodes && node_set != nullptr && core_set != nullptr; ++i) {
    hwloc_obj_t node = hwloc_get_obj_by_type(t, HWLOC_OBJ_NUMANODE, unsigned(i));
    if (node == nullptr) continue;
    Entry e;
    e.info.os_index = node->os_index != HWLOC_UNKNOWN_INDEX ? int(node->os_index) : int(node->logical_index);
    e.info.memory_bytes = node->attr != nullptr ? uint64_t(node->attr->numanode.local_memory) : 0;
    if (node->cpuset != nullptr) hwloc_bitmap_and(node_set, node->cpuset, usable);
    else hwloc_bitmap_zero(node_set);
    e.info.cpus = bitmap_to_ids(node_set);
    if (num_cores > 0) {
      for (int c = 0; c < num_cores; ++c) {
        hwloc_obj_t core = hwloc_get_obj_by_type(t, HWLOC_OBJ_CORE, unsigned(c));
        if (core == nullptr || core->cpuset == nullptr) continue;
        hwloc_bitmap_and(core_set, core->cpuset, node_set);
        if (!hwloc_bitmap_iszero(core_set)) e.cores.push_back(bitmap_to_ids(core_set));
      }
    } else {
      for (int cpu : e.info.cpus) e.cores.push_back({cpu});
    }
    entries.push_back(std::move(e));
  }
  hwloc_bitmap_free(node_set);
  hwloc_bitmap_free(core_set);
  hwloc_topology_destroy(t);

  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.info.os_index < b.info.os_index; });
  bool any_cpu = false;
  for (const Entry& e : entries) any_cpu = any_cpu || !e.info.cpus.empty();
  if (!any_cpu) return false;  // no usable NUMA description: caller falls back
  for (Entry& e : entries) {
    d.topo.nodes.push_back(std::move(e.info));
    d.node_cores.push_back(std::move(e.cores));
  }
  if (d.topo.nodes.size() == 1 && d.topo.nodes[0].memory_bytes == 0)
    d.topo.nodes[0].memory_bytes = physical_memory_bytes();
  return true;
}

Discovered discover() noexcept {
  Discovered d;
  try {
    if (!discover_with_hwloc(d)) {
      // No NUMA node (some containers) or no hwloc topology: one node 0
      // holding every CPU we may use. Counts come from the kernel unless
      // hwloc supplied them.
      std::vector<int> cpus = affinity_cpus();
      if (d.topo.num_pus <= 1) d.topo.num_pus = int(cpus.size());
      if (d.topo.num_cores <= 1) d.topo.num_cores = int(cpus.size());
      describe_as_single_node(d, std::move(cpus));
    }
    fill_missing_caches(d.topo.caches);
  } catch (...) {
    // Out of memory while describing the machine: the smallest valid answer.
    d = Discovered();
    try {
      describe_as_single_node(d, {0});
    } catch (...) {
    }
  }
  return d;
}

const Discovered& discovered() {
  static const Discovered d = discover();
  return d;
}

}  // namespace

const Topology& topology() { return discovered().topo; }

bool pin_current_thread(int numa_node, int slot) {
  const Discovered& d = discovered();
  for (size_t i = 0; i < d.topo.nodes.size(); ++i) {
    if (d.topo.nodes[i].os_index != numa_node) continue;
    const auto& cores = d.node_cores[i];
    if (cores.empty()) return false;
    const int n = int(cores.size());
    const std::vector<int>& cpus = cores[size_t(((slot % n) + n) % n)];
    const int max_cpu = *std::max_element(cpus.begin(), cpus.end());
    cpu_set_t* set = CPU_ALLOC(max_cpu + 1);
    if (set == nullptr) return false;
    const size_t bytes = CPU_ALLOC_SIZE(max_cpu + 1);
    CPU_ZERO_S(bytes, set);
    for (int c : cpus) CPU_SET_S(size_t(c), bytes, set);
    const int rc = pthread_setaffinity_np(pthread_self(), bytes, set);
    CPU_FREE(set);
    return rc == 0;
  }
  return false;
}

}  // namespace kt
