// Orders one CUDA stream after another without the host waiting.
//
// torch's Stream.wait_stream builds a Python Event, records it and waits on
// it: several microseconds of host work on every dispatch and combine, which
// at decode sizes are host-bound. Here it is one event record and one wait.
#pragma once

#include <cstdint>

namespace deepcomm {

// `waiter` (a cudaStream_t) runs nothing queued after this call until the work
// queued on `waited` so far has finished.
void order_streams(uintptr_t waiter, uintptr_t waited);

}  // namespace deepcomm
