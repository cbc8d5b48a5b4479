// Error reporting for the C++ core: every failing CUDA call becomes a C++
// exception carrying the call, the file:line and CUDA's own message. pybind11
// turns these into Python RuntimeError, so no failure is silent and none aborts
// the interpreter.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace deepcomm {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* expr, const char* file, int line) {
  throw CudaError(std::string("CUDA error '") + cudaGetErrorString(status) + "' (" + cudaGetErrorName(status) +
                  ") from " + expr + " at " + file + ":" + std::to_string(line));
}

}  // namespace deepcomm

#define DC_CUDA_CHECK(expr)                                                   \
  do {                                                                        \
    cudaError_t dc_status_ = (expr);                                          \
    if (dc_status_ != cudaSuccess) {                                          \
      ::deepcomm::throw_cuda_error(dc_status_, #expr, __FILE__, __LINE__);    \
    }                                                                         \
  } while (0)

// Argument checks in launch code: a violated precondition is a bug in the
// Python layer (which validates first), reported with the argument's name.
#define DC_CHECK_ARG(cond, message)                                          \
  do {                                                                        \
    if (!(cond)) throw std::invalid_argument(std::string(message));           \
  } while (0)
