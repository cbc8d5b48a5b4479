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

}  // namespace deepcomm::driver
