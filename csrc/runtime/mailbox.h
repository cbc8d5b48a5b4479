// Host side of the kernels' mailbox (pinned, mapped memory the GPU writes).
#pragma once

#include <cstdint>

namespace deepcomm {

enum class MailboxWait : int { kDone = 0, kKernelError = 1, kHostTimeout = 2 };

// Spins (without the GIL) until mailbox->notify_done >= call, the kernels
// report an error, or timeout_s passes.
MailboxWait wait_notify(uintptr_t mailbox, int64_t call, double timeout_s);

}  // namespace deepcomm
