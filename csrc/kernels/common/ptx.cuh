// Memory-model primitives for signalling between ranks. Peers' buffers are
// mapped into this process by CUDA IPC; they may live on another GPU (NVLink)
// or on this one (ranks sharing a GPU under MPS), so every flag uses system
// scope and every read of a peer's data bypasses L1 (ld.global.cg): L1 is not
// coherent and may hold lines from an earlier call.
#pragma once

#include <cstdint>

namespace deepcomm::ptx {

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* address) {
  uint32_t value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// A flag with no ordering of its own: for one that only says "done reading" (see its callers).
__device__ __forceinline__ void store_relaxed_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ void add_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// 16-byte loads: .nc for this rank's own inputs (read-only for the kernel's
// lifetime), .cg for peers' buffers (written by other processes).
__device__ __forceinline__ int4 load_nc(const int4* address) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

__device__ __forceinline__ int4 load_cg(const int4* address) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

// Programmatic dependent launch (sm_90 on; nothing before). A kernel launched early (kernels/common/launch.cuh)
// may have its blocks resident while the kernel before it on the stream still runs: it waits here, before it
// touches memory, for that kernel to end and its writes to be visible.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// This block's part of letting the kernel queued behind this one (when launched early) start its blocks: they
// start once every block of this grid got here or ended, and still wait for this grid to end.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace deepcomm::ptx
