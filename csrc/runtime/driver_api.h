// Driver API entry points resolved at run time through the CUDA runtime
// (cudaGetDriverEntryPointByVersion), so the module never links libcuda.so and
// imports on machines that have no driver. Add an entry point here when the
// runtime API lacks the call.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deepcomm::driver {

// Base address and size of the allocation that contains `ptr`
// (cuMemGetAddressRange). Throws when `ptr` is not device memory.
void allocation_range(uintptr_t ptr, uintptr_t* base, size_t* size);

// Queues on `stream` (a cudaStream_t) a write of `value` to `address` (device memory, a peer's
// mapped memory included), after a fence that makes the stream's earlier work, copies included,
// visible first (cuStreamWriteValue32): how a copy engine's rows are signalled without an SM.
void stream_write_value32(uintptr_t stream, uintptr_t address, uint32_t value);
// Throws now if stream_write_value32 could not work (the entry point missing): a communicator that may
// push asks before its first combine, not halfway through queueing one.
void require_stream_write_value32();

}  // namespace deepcomm::driver
