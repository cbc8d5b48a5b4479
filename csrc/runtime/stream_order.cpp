#include "runtime/stream_order.h"

#include <cuda_runtime_api.h>

#include <mutex>
#include <vector>

#include "runtime/addresses.h"
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

// Free events of StreamPoints, per device (an event is recorded on streams of the device it was
// made on). Never destroyed: a pool outliving the driver at exit must not call into it.
class EventPool {
 public:
  cudaEvent_t take(int device) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<size_t>(device) < free_.size() && !free_[device].empty()) {
        cudaEvent_t event = free_[device].back();
        free_[device].pop_back();
        return event;
      }
    }
    int current = 0;
    DC_CUDA_CHECK(cudaGetDevice(&current));
    if (current != device) DC_CUDA_CHECK(cudaSetDevice(device));
    cudaEvent_t event = nullptr;
    const cudaError_t status = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
    if (current != device) DC_CUDA_CHECK(cudaSetDevice(current));
    DC_CUDA_CHECK(status);
    return event;
  }
  void give_back(int device, cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (static_cast<size_t>(device) >= free_.size()) free_.resize(device + 1);
    free_[device].push_back(event);
  }

 private:
  std::mutex mutex_;
  std::vector<std::vector<cudaEvent_t>> free_;
};

EventPool& event_pool() {
  static EventPool* pool = new EventPool();
  return *pool;
}

}  // namespace

void order_streams(uintptr_t waiter, uintptr_t waited) {
  if (waiter == waited) return;
  thread_local OrderingEvents events;
  cudaEvent_t event = events.of_current_device();
  DC_CUDA_CHECK(cudaEventRecord(event, as_stream(waited)));
  DC_CUDA_CHECK(cudaStreamWaitEvent(as_stream(waiter), event, 0));
}

StreamPoint::StreamPoint(uintptr_t stream, int device) : event_(event_pool().take(device)), device_(device) {
  // Recorded with `device` current: a stream handle of 0 names the current device's default stream.
  int current = 0;
  cudaError_t status = cudaGetDevice(&current);
  if (status == cudaSuccess && current != device) status = cudaSetDevice(device);
  if (status == cudaSuccess) status = cudaEventRecord(event_, as_stream(stream));
  if (current != device) (void)cudaSetDevice(current);
  if (status != cudaSuccess) {
    event_pool().give_back(device_, event_);
    DC_CUDA_CHECK(status);
  }
}

StreamPoint::~StreamPoint() { event_pool().give_back(device_, event_); }

void StreamPoint::wait(uintptr_t stream) const { DC_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), event_, 0)); }

void StreamPoint::synchronize() const { DC_CUDA_CHECK(cudaEventSynchronize(event_)); }

bool StreamPoint::query() const {
  const cudaError_t status = cudaEventQuery(event_);
  if (status == cudaErrorNotReady) {
    (void)cudaGetLastError();  // not an error: clear it
    return false;
  }
  DC_CUDA_CHECK(status);
  return true;
}

}  // namespace deepcomm
