// Names for CUDA streams in Nsight Systems timelines (NVTX v3, header-only:
// a no-op unless a tool such as nsys injects itself).
#pragma once

#include <cstdint>
#include <string>

namespace deepcomm {

void name_stream(uintptr_t stream, const std::string& name);

}  // namespace deepcomm
