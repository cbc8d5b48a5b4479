// The inter-node transport interface (DESIGN.md decision 7). The hierarchical
// kernels (internode.cu) are templated on it and written once:
//
//   uint8_t* local(offset)                  this rank's transport region
//   uint8_t* window(pe, remote, staging)    where to write bytes bound for pe's
//                                           `remote` offset: the peer's memory
//                                           itself, or local staging that the
//                                           next put carries (a NIC reads memory)
//   put_signal_warp(pe, remote, staging, bytes, signal, value, op, lane)
//                                           warp-collective: deliver the bytes
//                                           (nothing to do where window() was pe's memory),
//                                           then apply `value` to pe's signal
//                                           word, ordered after the bytes and
//                                           after every earlier put to pe
//   signal(pe, signal, value, op)           one thread, ordered after earlier puts
//   quiet()                                 earlier puts complete (staging reusable)
//
// Signal words live in the transport region and are read locally with
// acquire loads. Offsets are identical on every rank (symmetric layout).
#pragma once

#include <cstdint>

#include "kernels/common/ptx.cuh"
#include "runtime/internode_layout.h"

#ifdef DEEPCOMM_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace deepcomm::internode {

enum class SignalOp : int { kSet = 0, kAdd = 1 };

// A signal word of a peer whose memory is mapped here (CUDA IPC, or NVSHMEM's
// P2P mapping): every store this block made before (seen through
// __syncthreads) lands first.
__device__ __forceinline__ void signal_mapped(uint8_t* word_address, uint64_t value, SignalOp op) {
  uint64_t* word = reinterpret_cast<uint64_t*>(word_address);
  __threadfence_system();
  if (op == SignalOp::kAdd) ptx::add_release_sys(word, value);
  else ptx::store_release_sys(word, value);
}

// CUDA-IPC peer memory standing in for the NIC: every rank's transport region
// is mapped here. `staged` makes senders write local staging and copy it on
// put, exactly the access pattern of a NIC-based transport (tests use it to
// cover that path on one GPU); otherwise senders store straight to the peer.
struct IpcTransport {
  uint8_t* regions[kMaxRanks];
  int rank;
  bool staged;

  __device__ __forceinline__ uint8_t* local(int64_t offset) const { return regions[rank] + offset; }

  __device__ __forceinline__ uint8_t* window(int pe, int64_t remote, int64_t staging) const {
    return staged ? regions[rank] + staging : regions[pe] + remote;
  }

  __device__ __forceinline__ void put_signal_warp(int pe, int64_t remote, int64_t staging, int64_t bytes,
                                                  int64_t signal_offset, uint64_t value, SignalOp op, int lane) const {
    if (staged) {
      const int4* from = reinterpret_cast<const int4*>(regions[rank] + staging);
      int4* to = reinterpret_cast<int4*>(regions[pe] + remote);
      for (int64_t unit = lane; unit < bytes / 16; unit += 32) to[unit] = from[unit];
    }
    __syncwarp();
    if (lane == 0) signal(pe, signal_offset, value, op);
    __syncwarp();
  }

  __device__ __forceinline__ void signal(int pe, int64_t signal_offset, uint64_t value, SignalOp op) const {
    signal_mapped(regions[pe] + signal_offset, value, op);
  }

  __device__ __forceinline__ void quiet() const { __threadfence_system(); }
};

#ifdef DEEPCOMM_WITH_NVSHMEM
// NVSHMEM symmetric heap. A PE whose heap NVSHMEM maps into this process
// (another GPU of this host over NVLink: nvshmem_ptr) is written directly by
// the senders' own stores, as CUDA IPC does: NVSHMEM's put-with-signal on P2P
// copies each staged row a second time with a warp memcpy, 5.6x slower on two
// H200s (docs/benchmarks.md). Every other PE (across hosts: the NIC) gets
// staging + put-with-signal; a fence before each put keeps puts to one PE in
// order, so a tail count of n means the first n rows have landed.
struct NvshmemTransport {
  uint8_t* base;               // the symmetric region (same address on every PE)
  uint8_t* peers[kMaxRanks];   // pe's region mapped here, or null: reached by puts only
  int rank;

  __device__ __forceinline__ uint8_t* local(int64_t offset) const { return base + offset; }

  __device__ __forceinline__ uint8_t* window(int pe, int64_t remote, int64_t staging) const {
    return peers[pe] != nullptr ? peers[pe] + remote : base + staging;
  }

  __device__ __forceinline__ void put_signal_warp(int pe, int64_t remote, int64_t staging, int64_t bytes,
                                                  int64_t signal_offset, uint64_t value, SignalOp op, int lane) const {
    __syncwarp();
    if (peers[pe] != nullptr) {  // the bytes are in pe's memory already
      if (lane == 0) signal_mapped(peers[pe] + signal_offset, value, op);
      __syncwarp();
      return;
    }
    if (lane == 0) {
      __threadfence();  // rows written by the block's other warps (seen through __syncthreads) first
      nvshmem_fence();
    }
    __syncwarp();
    nvshmemx_putmem_signal_nbi_warp(base + remote, base + staging, static_cast<size_t>(bytes),
                                    reinterpret_cast<uint64_t*>(base + signal_offset), value,
                                    op == SignalOp::kAdd ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET, pe);
    __syncwarp();
  }

  __device__ __forceinline__ void signal(int pe, int64_t signal_offset, uint64_t value, SignalOp op) const {
    if (peers[pe] != nullptr) {
      signal_mapped(peers[pe] + signal_offset, value, op);
      return;
    }
    nvshmem_fence();
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(base + signal_offset), value,
                       op == SignalOp::kAdd ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET, pe);
  }

  __device__ __forceinline__ void quiet() const {
    __threadfence_system();  // direct stores to mapped peers
    nvshmem_quiet();         // puts
  }
};
#endif

}  // namespace deepcomm::internode
