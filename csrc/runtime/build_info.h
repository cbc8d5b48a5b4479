// What this build of deepcomm._C contains: version, CUDA toolkit it was
// compiled with, target architectures and optional components.
#pragma once

#include <map>
#include <string>

namespace deepcomm {

// Keys: version, cuda_compiled, cuda_archs, nvshmem ("" when built without),
// nvshmem_linked (the NVSHMEM host library's own version, "" when absent).
std::map<std::string, std::string> build_info();

}  // namespace deepcomm
