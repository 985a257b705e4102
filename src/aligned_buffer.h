// Owning, 64-byte aligned memory. Large buffers (>= 2 MiB) come from mmap
// with transparent huge pages advised, so packed weights take fewer TLB
// misses; pages are not touched here, so the first thread that writes a page
// (a thread of the NUMA node that will read it) places it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kt {

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& o) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // Grows (never shrinks) to at least `bytes`; contents are not preserved.
  void ensure(size_t bytes);

 private:
  void release();
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
};

}  // namespace kt
