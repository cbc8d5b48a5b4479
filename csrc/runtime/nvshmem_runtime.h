// NVSHMEM host runtime for the inter-node transport (DESIGN.md decisions 4, 7):
// bootstrap from a unique id that the Python layer broadcasts over the torch
// process group, symmetric allocations, and a device-side ring check that
// proves the device library is linked and the PEs reach each other.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace deepcomm::nvshmem {

std::string unique_id();  // call on one rank, broadcast the bytes
void init(const std::string& unique_id, int rank, int num_ranks);
void finalize();
bool initialized();
int my_pe();
int n_pes();
uintptr_t symmetric_malloc(size_t bytes);  // collective; zeroed
void symmetric_free(uintptr_t ptr);
// Where `ptr` (a symmetric address) of PE `pe` is mapped into this process for
// plain loads and stores (another GPU of this host, over NVLink), or 0 where
// only NVSHMEM's puts reach it (another host). `ptr` itself for this PE.
uintptr_t peer_pointer(uintptr_t ptr, int pe);
void barrier_all();
// Each PE writes its own PE id into `slot` (a symmetric int32) of the next PE,
// then all PEs meet in a barrier on `stream`. Afterwards slot == (pe - 1) mod n.
void ring_exchange(uintptr_t slot, cudaStream_t stream);

}  // namespace deepcomm::nvshmem
