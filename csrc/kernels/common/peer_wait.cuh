// Bounded waits on flags written by peers. A wait that outlives the timeout
// records (stage, peer) in the host mailbox and gives up, so the host raises
// an error naming both instead of hanging.
#pragma once

#include "kernels/common/ptx.cuh"
#include "runtime/intranode_layout.h"

namespace deepcomm {

__device__ inline void report_error(intranode::HostMailbox* mailbox, int64_t code, int64_t stage, int64_t detail) {
  volatile int64_t* slots = reinterpret_cast<volatile int64_t*>(mailbox);
  if (slots[0] != 0) return;  // keep the first failure: later stages fail because of it
  slots[1] = stage;
  slots[2] = detail;
  __threadfence_system();
  slots[0] = code;
  __threadfence_system();
}

// Waits until flags[peer] >= target for every peer; one thread calls this.
// Returns false (after reporting) when some peer did not get there in time.
__device__ inline bool wait_for_peers(const uint64_t* flags, int num_ranks, uint64_t target, int64_t timeout_ns,
                                      intranode::HostMailbox* mailbox, int64_t stage) {
  const uint64_t start = ptx::global_timer_ns();
  for (int peer = 0; peer < num_ranks; ++peer) {
    while (ptx::load_acquire_sys(flags + peer) < target) {
      if (static_cast<int64_t>(ptx::global_timer_ns() - start) > timeout_ns) {
        report_error(mailbox, intranode::kErrorTimeout, stage, peer);
        return false;
      }
    }
  }
  return true;
}

}  // namespace deepcomm
