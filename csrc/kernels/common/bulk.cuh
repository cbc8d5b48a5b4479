// Bulk (TMA) row moves for Hopper: a warp stages a piece of a row in shared
// memory with one cp.async.bulk load and writes it to each of its targets with
// one bulk store, each target's store issued by its own lane.
//
// Why: the register path (rows.cuh) keeps a few 16-byte loads in flight per
// lane and every target's pointer in every lane; a 7 KB fp8 row then costs
// several memory latencies, and a row with 16 targets runs the kernel into the
// register cap. A bulk load costs one latency per piece whatever its size, and
// a lane holds one target. The internode sender and forwarder use it (fp8
// dispatch 604 -> 430 us at 2x2 on one H100); the intranode dispatch measured
// slower with it (bf16 541 -> 643 us, docs/benchmarks.md) and keeps registers.
//
// Memory model: the copy engine works in the async proxy. Rows that another
// thread wrote with ordinary stores (a peer's puts, seen through an acquire)
// need fence.proxy.async before a bulk load reads them; bulk stores must have
// completed (wait_group 0) and be fenced back to the generic proxy before a
// release signals them to anyone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "kernels/common/ptx.cuh"
#include "runtime/error.h"

namespace deepcomm::bulk {

constexpr int kPieceBytes = 8192;  // staging per warp: a 7168-byte fp8 row in one piece, bf16 in two

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Bulk copies and the async proxy are Hopper's (sm_90); an older target (DEEPCOMM_CUDA_ARCHS may
// list one) moves the same bytes through registers, with the same interface.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define DEEPCOMM_BULK_COPIES 0
#else
#define DEEPCOMM_BULK_COPIES 1
#endif

// Generic-proxy writes (seen by this thread) become visible to its later bulk copies, and
// completed bulk writes to its later generic accesses.
__device__ __forceinline__ void fence_proxy_global() {
#if DEEPCOMM_BULK_COPIES
  asm volatile("fence.proxy.async.global;" ::: "memory");
#endif
}

// One warp's staging buffer and the barrier its bulk loads complete on.
struct WarpStage {
  uint8_t* buffer;    // kPieceBytes of shared memory, 16-byte aligned
  uint64_t* barrier;  // an mbarrier in shared memory
  uint32_t parity;    // phase of the barrier the next load completes

  // Lane 0 sets up the barrier; the caller syncs the block (or warp) before first use.
  __device__ __forceinline__ void init(uint8_t* staging, uint64_t* bar, int lane) {
    buffer = staging;
    barrier = bar;
    parity = 0;
#if DEEPCOMM_BULK_COPIES
    if (lane == 0) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(barrier)) : "memory");
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
#endif
  }

  // Moves `bytes` (a multiple of 16; both ends 16-byte aligned) from `source` to this lane's
  // `target` (nullptr: none), piece by piece. Warp-collective. On return the stores have read the
  // staging buffer but may still be on their way: complete_stores() before signalling them.
  __device__ __forceinline__ void move(const uint8_t* source, int64_t bytes, uint8_t* target, int lane) {
    if (__ballot_sync(0xffffffffu, target != nullptr) == 0) return;  // a token that goes nowhere
#if DEEPCOMM_BULK_COPIES
    for (int64_t offset = 0; offset < bytes; offset += kPieceBytes) {
      const uint32_t piece = static_cast<uint32_t>(bytes - offset < kPieceBytes ? bytes - offset : kPieceBytes);
      if (lane == 0) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)),
                     "r"(piece)
                     : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                shared_address(buffer)),
            "l"(source + offset), "r"(piece), "r"(shared_address(barrier))
            : "memory");
      }
      wait_loaded();
      if (target != nullptr) {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(target + offset),
                     "r"(shared_address(buffer)), "r"(piece)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // the buffer may be refilled
      }
      __syncwarp();
    }
#else
    const int64_t units = bytes / 16;
    for (int t = 0; t < 32; ++t) {
      int4* to = reinterpret_cast<int4*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(target), t));
      if (to == nullptr) continue;
      for (int64_t unit = lane; unit < units; unit += 32) to[unit] = ptx::load_cg(reinterpret_cast<const int4*>(source) + unit);
    }
#endif
  }

  // This lane's bulk stores have landed and are ordered before its later generic accesses
  // (the caller's fence + release then publishes them).
  __device__ __forceinline__ static void complete_stores() {
#if DEEPCOMM_BULK_COPIES
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    fence_proxy_global();
#endif
  }

 private:
  __device__ __forceinline__ void wait_loaded() {
#if DEEPCOMM_BULK_COPIES
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{\n"
          "  .reg .pred complete;\n"
          "  mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
          "  selp.u32 %0, 1, 0, complete;\n"
          "}\n"
          : "=r"(done)
          : "r"(shared_address(barrier)), "r"(parity)
          : "memory");
    }
    parity ^= 1;
#endif
  }
};

constexpr int kMaxDevices = 64;

// Host: lets kKernel launch with `bytes` of dynamic shared memory (above the default 48 KiB), once
// per kernel and device (the setting is per device): a dispatch's host time matters at decode sizes.
template <auto kKernel>
void allow_staging(int bytes) {
  static std::once_flag done[kMaxDevices];
  int device = 0;
  DC_CUDA_CHECK(cudaGetDevice(&device));
  auto allow = [bytes] {
    DC_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  };
  if (device < kMaxDevices) std::call_once(done[device], allow);
  else allow();
}

}  // namespace deepcomm::bulk
