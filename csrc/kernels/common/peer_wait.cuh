// Bounded waits on flags written by peers. A wait that outlives the timeout
// records (stage, peer) in the host mailbox and gives up, so the host raises
// an error naming both instead of hanging.
#pragma once

#include "kernels/common/ptx.cuh"
#include "runtime/mailbox_layout.h"

namespace deepcomm {

__device__ inline void report_error(MailboxHeader* mailbox, int64_t code, int64_t stage, int64_t detail) {
  volatile int64_t* slots = reinterpret_cast<volatile int64_t*>(mailbox);
  if (slots[0] != 0) return;  // keep the first failure: later stages fail because of it
  slots[1] = stage;
  slots[2] = detail;
  __threadfence_system();
  slots[0] = code;
  __threadfence_system();
}

// Spins until ready(value of *flag) holds; one thread calls this. Returns
// false (after reporting `peer` and `stage`) when the timeout passes first.
// Word is uint64_t (counters) or uint32_t (counts that wrap).
template <typename Word, typename Ready>
__device__ inline bool wait_until(const Word* flag, Ready ready, int64_t timeout_ns, MailboxHeader* mailbox,
                                  int64_t stage, int peer) {
  if (ready(ptx::load_acquire_sys(flag))) return true;
  const uint64_t start = ptx::global_timer_ns();
  while (!ready(ptx::load_acquire_sys(flag))) {
    if (static_cast<int64_t>(ptx::global_timer_ns() - start) > timeout_ns) {
      report_error(mailbox, kErrorTimeout, stage, peer);
      return false;
    }
  }
  return true;
}

// Waits until flags[i] >= target for every i < num_peers (flag i written by
// rank first_peer + i); one thread calls this.
__device__ inline bool wait_for_peers(const uint64_t* flags, int num_peers, uint64_t target, int64_t timeout_ns,
                                      MailboxHeader* mailbox, int64_t stage, int first_peer = 0) {
  const uint64_t start = ptx::global_timer_ns();
  for (int peer = 0; peer < num_peers; ++peer) {
    while (ptx::load_acquire_sys(flags + peer) < target) {
      if (static_cast<int64_t>(ptx::global_timer_ns() - start) > timeout_ns) {
        report_error(mailbox, kErrorTimeout, stage, first_peer + peer);
        return false;
      }
    }
  }
  return true;
}

}  // namespace deepcomm
