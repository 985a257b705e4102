// What the machine looks like: NUMA nodes with their CPUs and memory, core
// and hardware-thread counts, cache sizes. The thread pool pins its workers
// with it and the MoE layer sizes its NUMA shards and tiles from it.
//
// Discovered once through hwloc (restricted to the CPUs and nodes this
// process may use, so a cgroup/cpuset container sees its own share), then
// read-only and safe to read from any thread. Discovery never throws: when
// hwloc fails or reports no NUMA node, the machine is described as one node 0
// holding every CPU the process may run on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kt {

struct NumaNodeInfo {
  int os_index;           // the node number the OS uses (numactl, /sys)
  std::vector<int> cpus;  // OS ids of the CPUs (hardware threads) of this node, ascending; empty for a memory-only node
  uint64_t memory_bytes;  // local memory of the node (0 if unknown)
};

// Bytes per cache instance (one core's L1d/L2, one L3 slice group), 0 if
// unknown.
struct CacheSizes {
  size_t l1d = 0, l2 = 0, l3 = 0;
};

struct Topology {
  int num_cores = 1;  // physical cores the process may use
  int num_pus = 1;    // hardware threads the process may use
  std::vector<NumaNodeInfo> nodes;  // ascending os_index; never empty
  CacheSizes caches;
};

// The machine's topology, discovered on first call (thread-safe).
const Topology& topology();

// Pins the calling thread to one core of NUMA node `numa_node` (OS index):
// the slot-th core of that node, round-robin (slot modulo the node's core
// count), bound to all hardware threads of that core. Returns false (and
// leaves the affinity unchanged) if the node is unknown, has no CPUs, or the
// binding fails. Never throws.
bool pin_current_thread(int numa_node, int slot);

}  // namespace kt
