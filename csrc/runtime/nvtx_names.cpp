#include "runtime/nvtx_names.h"

#include <cuda_runtime_api.h>
#include <nvtx3/nvToolsExtCudaRt.h>

namespace deepcomm {

void name_stream(uintptr_t stream, const std::string& name) {
  nvtxNameCudaStreamA(reinterpret_cast<cudaStream_t>(stream), name.c_str());
}

}  // namespace deepcomm
