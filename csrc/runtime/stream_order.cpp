#include "runtime/stream_order.h"

#include <cuda_runtime_api.h>

#include <vector>

#include "runtime/error.h"

namespace deepcomm {

namespace {

// One event per device and host thread serves every ordering: cudaStreamWaitEvent
// captures the event's latest record when it is called, so the event may be
// recorded again at once (CUDA runtime API, cudaStreamWaitEvent). Per thread, so
// two threads never interleave a record and a wait.
class OrderingEvents {
 public:
  cudaEvent_t of_current_device() {
    int device = 0;
    DC_CUDA_CHECK(cudaGetDevice(&device));
    if (static_cast<size_t>(device) >= events_.size()) events_.resize(device + 1, nullptr);
    if (events_[device] == nullptr) {
      DC_CUDA_CHECK(cudaEventCreateWithFlags(&events_[device], cudaEventDisableTiming));
    }
    return events_[device];
  }
  ~OrderingEvents() {
    // At thread or process exit the driver may already be gone: nothing to report then.
    for (cudaEvent_t event : events_) {
      if (event != nullptr) cudaEventDestroy(event);
    }
  }

 private:
  std::vector<cudaEvent_t> events_;
};

}  // namespace

void order_streams(uintptr_t waiter, uintptr_t waited) {
  if (waiter == waited) return;
  thread_local OrderingEvents events;
  cudaEvent_t event = events.of_current_device();
  DC_CUDA_CHECK(cudaEventRecord(event, reinterpret_cast<cudaStream_t>(waited)));
  DC_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(waiter), event, 0));
}

}  // namespace deepcomm
