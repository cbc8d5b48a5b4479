#include "runtime/nvshmem_runtime.h"

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <stdexcept>

#include "runtime/error.h"

namespace deepcomm::nvshmem {

namespace {

bool g_initialized = false;

void require_initialized(const char* what) {
  if (!g_initialized) throw std::runtime_error(std::string(what) + ": NVSHMEM is not initialised (call init first)");
}

__global__ void ring_exchange_kernel(int32_t* slot) {
  const int pe = nvshmem_my_pe();
  const int next = (pe + 1) % nvshmem_n_pes();
  nvshmem_int_p(slot, pe, next);
  nvshmem_quiet();
}

}  // namespace

std::string unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) throw std::runtime_error("nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void init(const std::string& id_bytes, int rank, int num_ranks) {
  DC_CHECK_ARG(id_bytes.size() == sizeof(nvshmemx_uniqueid_t),
               "unique_id: expected " + std::to_string(sizeof(nvshmemx_uniqueid_t)) + " bytes");
  DC_CHECK_ARG(num_ranks > 0 && rank >= 0 && rank < num_ranks, "rank: must lie in [0, num_ranks)");
  if (g_initialized) throw std::runtime_error("init: NVSHMEM is already initialised in this process");
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, id_bytes.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) != 0) {
    throw std::runtime_error("nvshmemx_set_attr_uniqueid_args failed");
  }
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0) {
    throw std::runtime_error("nvshmemx_init_attr failed for rank " + std::to_string(rank));
  }
  g_initialized = true;
}

void finalize() {
  if (!g_initialized) return;
  nvshmem_finalize();
  g_initialized = false;
}

bool initialized() { return g_initialized; }

int my_pe() {
  require_initialized("my_pe");
  return nvshmem_my_pe();
}

int n_pes() {
  require_initialized("n_pes");
  return nvshmem_n_pes();
}

uintptr_t symmetric_malloc(size_t bytes) {
  require_initialized("symmetric_malloc");
  void* ptr = nvshmem_malloc(bytes);
  if (ptr == nullptr && bytes > 0) {
    throw std::runtime_error("symmetric_malloc: nvshmem_malloc of " + std::to_string(bytes) +
                             " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE?)");
  }
  // Zeroed, so that signal words start at 0 on every PE before anyone writes them.
  DC_CUDA_CHECK(cudaMemset(ptr, 0, bytes));
  DC_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_barrier_all();
  return reinterpret_cast<uintptr_t>(ptr);
}

void symmetric_free(uintptr_t ptr) {
  require_initialized("symmetric_free");
  nvshmem_free(reinterpret_cast<void*>(ptr));
}

uintptr_t peer_pointer(uintptr_t ptr, int pe) {
  require_initialized("peer_pointer");
  DC_CHECK_ARG(pe >= 0 && pe < nvshmem_n_pes(), "pe: must lie in [0, n_pes)");
  return reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<void*>(ptr), pe));
}

void barrier_all() {
  require_initialized("barrier_all");
  nvshmem_barrier_all();
}

void ring_exchange(uintptr_t slot, cudaStream_t stream) {
  require_initialized("ring_exchange");
  ring_exchange_kernel<<<1, 1, 0, stream>>>(reinterpret_cast<int32_t*>(slot));
  DC_CUDA_CHECK(cudaGetLastError());
  nvshmemx_barrier_all_on_stream(stream);
}

}  // namespace deepcomm::nvshmem
