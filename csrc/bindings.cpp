// pybind11 bindings for deepcomm._C: argument conversion only, no logic.
// Pointers and streams cross as Python ints (DESIGN.md decision 1).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kernels/layout.h"
#include "runtime/build_info.h"
#include "runtime/device.h"
#include "runtime/ipc.h"
#ifdef DEEPCOMM_WITH_NVSHMEM
#include "runtime/nvshmem_runtime.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepcomm C++/CUDA core (no torch headers: pointers, sizes and streams are ints)";

  m.def("build_info", &deepcomm::build_info);
  m.def("device_count", &deepcomm::device_count);
  m.def("driver_version", &deepcomm::driver_version);
  m.def("runtime_version", &deepcomm::runtime_version);
  m.def("device_info", [](int device) {
    const deepcomm::DeviceInfo info = deepcomm::device_info(device);
    py::dict d;
    d["index"] = info.index;
    d["name"] = info.name;
    d["compute_capability"] = py::make_tuple(info.major, info.minor);
    d["num_sms"] = info.num_sms;
    d["total_memory_bytes"] = info.total_memory_bytes;
    d["max_shared_memory_per_block_optin"] = info.max_shared_memory_per_block_optin;
    d["can_map_host_memory"] = info.can_map_host_memory;
    return d;
  });

  m.attr("IPC_HANDLE_BYTES") = deepcomm::kIpcHandleBytes;
  m.def("ipc_export", [](uintptr_t ptr) {
    const deepcomm::IpcExport exported = deepcomm::ipc_export(ptr);
    return py::make_tuple(py::bytes(exported.handle), exported.offset, exported.allocation_bytes);
  }, py::arg("ptr"), "Export device memory: (handle bytes, offset of ptr in its allocation, allocation bytes).");
  m.def("ipc_open", [](py::bytes handle, size_t offset) { return deepcomm::ipc_open(handle, offset); },
        py::arg("handle"), py::arg("offset"));
  m.def("ipc_close", &deepcomm::ipc_close, py::arg("ptr"), py::arg("offset"));

  m.def("dispatch_layout_shared_bytes", &deepcomm::dispatch_layout_shared_bytes);
  m.def(
      "dispatch_layout",
      [](uintptr_t topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks, int ranks_per_node,
         uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_node, uintptr_t num_tokens_per_expert,
         uintptr_t is_token_in_rank, int num_blocks, uintptr_t stream) {
        deepcomm::DispatchLayoutArgs args{as_ptr<const int64_t>(topk_idx), num_tokens, num_topk, num_experts,
                                          num_ranks, ranks_per_node, as_ptr<int32_t>(num_tokens_per_rank),
                                          as_ptr<int32_t>(num_tokens_per_node), as_ptr<int32_t>(num_tokens_per_expert),
                                          as_ptr<bool>(is_token_in_rank)};
        deepcomm::launch_dispatch_layout(args, num_blocks, as_stream(stream));
      },
      py::arg("topk_idx"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("num_experts"), py::arg("num_ranks"),
      py::arg("ranks_per_node"), py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_node"),
      py::arg("num_tokens_per_expert"), py::arg("is_token_in_rank"), py::arg("num_blocks"), py::arg("stream"));

#ifdef DEEPCOMM_WITH_NVSHMEM
  py::module_ nv = m.def_submodule("nvshmem", "NVSHMEM host runtime (bootstrap by unique id)");
  nv.def("unique_id", []() { return py::bytes(deepcomm::nvshmem::unique_id()); });
  nv.def("init", [](py::bytes id, int rank, int num_ranks) { deepcomm::nvshmem::init(id, rank, num_ranks); },
         py::arg("unique_id"), py::arg("rank"), py::arg("num_ranks"));
  nv.def("finalize", &deepcomm::nvshmem::finalize);
  nv.def("initialized", &deepcomm::nvshmem::initialized);
  nv.def("my_pe", &deepcomm::nvshmem::my_pe);
  nv.def("n_pes", &deepcomm::nvshmem::n_pes);
  nv.def("malloc", &deepcomm::nvshmem::symmetric_malloc, py::arg("bytes"));
  nv.def("free", &deepcomm::nvshmem::symmetric_free, py::arg("ptr"));
  nv.def("barrier_all", &deepcomm::nvshmem::barrier_all);
  nv.def("ring_exchange", [](uintptr_t slot, uintptr_t stream) { deepcomm::nvshmem::ring_exchange(slot, as_stream(stream)); },
         py::arg("slot"), py::arg("stream"));
#endif
}
