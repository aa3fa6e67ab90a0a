// anydepth_native::advise_huge(p, bytes), shared by the kernels.
// glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with a fresh mapping, so
// such an output is page-faulted 4 KiB at a time on first write, which can cost more than the kernel
// that writes it. Asking for transparent huge pages on the fresh range faults it in 2 MiB pages
// instead. Smaller outputs come from glibc's heap, already faulted, and are left alone.
#pragma once
#include <cstdint>
#include <sys/mman.h>

namespace anydepth_native {
constexpr int64_t kHugeBytes = int64_t(32) << 20;

inline void advise_huge(void* p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  if (bytes < kHugeBytes) return;
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(huge - 1);
  // advice only: where THP is off or the range is not a mapping of its own, the kernel says no and
  // nothing changes
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}
}  // namespace anydepth_native
