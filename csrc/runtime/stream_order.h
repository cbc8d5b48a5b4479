// Orders CUDA streams after one another without the host waiting.
//
// torch's Stream.wait_stream builds a Python Event, records it and waits on
// it, and a torch.cuda.Event costs a Python object and a CUDA event per call:
// several microseconds of host work on every dispatch and combine, which at
// decode sizes are host-bound. Here an ordering is one event record and one
// wait, and a recorded point takes its event from a pool.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deepcomm {

// `waiter` (a cudaStream_t) runs nothing queued after this call until the work
// queued on `waited` so far has finished.
void order_streams(uintptr_t waiter, uintptr_t waited);

// A point recorded on a stream: the work queued on it so far. Its event comes
// from a per-device pool and goes back when the point is destroyed, which is
// safe at any time: a wait already queued on the event keeps the record it saw
// (CUDA runtime API, cudaStreamWaitEvent), and no one can wait on a point that
// no longer exists.
class StreamPoint {
 public:
  StreamPoint(uintptr_t stream, int device);  // `stream` is one of `device`'s (0: its default stream)
  ~StreamPoint();
  StreamPoint(const StreamPoint&) = delete;
  StreamPoint& operator=(const StreamPoint&) = delete;

  void wait(uintptr_t stream) const;  // `stream` runs nothing queued after this until the point is reached
  void synchronize() const;           // the host blocks until the point is reached
  bool query() const;                 // whether the point has been reached

 private:
  cudaEvent_t event_;
  int device_;
};

}  // namespace deepcomm
