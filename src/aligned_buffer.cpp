#include "aligned_buffer.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <utility>

namespace kt {
namespace {
constexpr size_t kHugePage = size_t(2) << 20;
}

AlignedBuffer::AlignedBuffer(size_t bytes) { ensure(bytes); }

AlignedBuffer::~AlignedBuffer() { release(); }

AlignedBuffer::AlignedBuffer(AlignedBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), mapped_(std::exchange(o.mapped_, false)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    mapped_ = std::exchange(o.mapped_, false);
  }
  return *this;
}

void AlignedBuffer::ensure(size_t bytes) {
  if (bytes <= size_) return;
  release();
  if (bytes >= kHugePage) {
    const size_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    madvise(p, len, MADV_HUGEPAGE);  // advice only: failure is harmless
    data_ = static_cast<uint8_t*>(p);
    size_ = len;
    mapped_ = true;
  } else {
    const size_t len = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, len);
    if (!p) throw std::bad_alloc();
    data_ = static_cast<uint8_t*>(p);
    size_ = len;
    mapped_ = false;
  }
}

void AlignedBuffer::release() {
  if (!data_) return;
  if (mapped_)
    munmap(data_, size_);
  else
    std::free(data_);
  data_ = nullptr;
  size_ = 0;
  mapped_ = false;
}

}  // namespace kt
