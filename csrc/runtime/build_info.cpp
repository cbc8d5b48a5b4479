#include "runtime/build_info.h"

#include <cuda_runtime_api.h>

#ifdef DEEPCOMM_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace deepcomm {

namespace {
std::string version_string(int encoded) {
  // CUDART_VERSION encodes major*1000 + minor*10.
  return std::to_string(encoded / 1000) + "." + std::to_string((encoded % 1000) / 10);
}
}  // namespace

std::map<std::string, std::string> build_info() {
  std::map<std::string, std::string> info;
  info["version"] = DEEPCOMM_VERSION;
  info["cuda_compiled"] = version_string(CUDART_VERSION);
  info["cuda_archs"] = DEEPCOMM_CUDA_ARCHS;
#ifdef DEEPCOMM_WITH_NVSHMEM
  info["nvshmem"] = std::to_string(NVSHMEM_VENDOR_MAJOR_VERSION) + "." + std::to_string(NVSHMEM_VENDOR_MINOR_VERSION) +
                    "." + std::to_string(NVSHMEM_VENDOR_PATCH_VERSION);
  int major = 0, minor = 0, patch = 0;
  nvshmemx_vendor_get_version_info(&major, &minor, &patch);
  info["nvshmem_linked"] = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
#else
  info["nvshmem"] = "";
  info["nvshmem_linked"] = "";
#endif
  return info;
}

}  // namespace deepcomm
