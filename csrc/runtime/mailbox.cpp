#include "runtime/mailbox.h"

#include <atomic>
#include <chrono>
#include <thread>

#include "runtime/mailbox_layout.h"

namespace deepcomm {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace

MailboxWait wait_notify(uintptr_t mailbox_address, int64_t call, double timeout_s) {
  auto* mailbox = reinterpret_cast<MailboxHeader*>(mailbox_address);
  volatile int64_t* done = &mailbox->notify_done;
  volatile int64_t* error = &mailbox->error_code;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (uint64_t spins = 0;; ++spins) {
    if (*done >= call) {
      std::atomic_thread_fence(std::memory_order_acquire);
      return MailboxWait::kDone;
    }
    if (*error != 0) return MailboxWait::kKernelError;
    // The peer we wait for may run on this core's other hardware thread (a VM's vCPUs can be
    // hyperthreads of one core without saying so): a pause per round leaves it the core's
    // execution units instead of racing through reads of one cached line.
    cpu_relax();
    // Notify takes tens of microseconds. After the first few, yield on every round: if a peer
    // rank shares this CPU, it is the one we wait for, and spinning through our time slice would
    // hold up its launch (1 ms a call, measured with two ranks on one CPU); with nobody else
    // runnable a yield returns at once.
    if (spins > 512) {
      std::this_thread::yield();
      // A yield may take a whole time slice under contention: look at the clock every round.
      if (std::chrono::steady_clock::now() > deadline) return MailboxWait::kHostTimeout;
    }
  }
}

}  // namespace deepcomm
