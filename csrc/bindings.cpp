// pybind11 bindings for deepcomm._C: argument conversion only, no logic.
// Pointers and streams cross as Python ints (DESIGN.md decision 1).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <type_traits>
#include <vector>

#include "kernels/copy.h"
#include "kernels/expert_order.h"
#include "kernels/intranode.h"
#include "kernels/layout.h"
#include "kernels/pair_sum.h"
#include "runtime/addresses.h"
#include "runtime/build_info.h"
#include "runtime/device.h"
#include "runtime/driver_api.h"
#include "runtime/error.h"
#include "runtime/nvtx_names.h"
#include "runtime/stream_order.h"
#include "runtime/ipc.h"
#include "runtime/mailbox.h"
#ifdef DEEPCOMM_WITH_NVSHMEM
#include "runtime/nvshmem_runtime.h"
#endif

namespace py = pybind11;
using deepcomm::as_ptr;
using deepcomm::as_stream;

void bind_internode(py::module_& m);  // bindings_internode.cpp
void bind_low_latency(py::module_& m);  // bindings_low_latency.cpp

namespace {

// One value per rank of the context, from a Python list.
template <typename From, typename To>
void copy_per_rank(const deepcomm::intranode::Context& ctx, const std::vector<From>& values, To* out, const char* name) {
  DC_CHECK_ARG(values.size() == static_cast<size_t>(ctx.num_ranks),
               std::string(name) + ": one value per rank (" + std::to_string(ctx.num_ranks) + "), got " +
                   std::to_string(values.size()));
  for (size_t r = 0; r < values.size(); ++r) {
    if constexpr (std::is_pointer_v<To>) out[r] = reinterpret_cast<To>(values[r]);
    else out[r] = static_cast<To>(values[r]);
  }
}

void fill_combine(deepcomm::intranode::CombineArgs& args, uintptr_t y, int hidden, int num_tokens,
                  uintptr_t is_token_in_rank, uintptr_t send_pos, uintptr_t send_base, uint64_t done_expected,
                  int num_blocks) {
  args.y = reinterpret_cast<void*>(y);
  args.hidden = hidden;
  args.num_tokens = num_tokens;
  args.is_token_in_rank = reinterpret_cast<const bool*>(is_token_in_rank);
  args.send_pos = reinterpret_cast<const int32_t*>(send_pos);
  args.send_base = reinterpret_cast<const int32_t*>(send_base);
  args.done_expected = done_expected;
  args.num_blocks = num_blocks;
}

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

  m.def("name_stream", &deepcomm::name_stream, py::arg("stream"), py::arg("name"),
        "Name a CUDA stream for Nsight Systems (NVTX).");
  m.def("order_streams", &deepcomm::order_streams, py::arg("waiter"), py::arg("waited"),
        "Make stream `waiter` wait for the work queued on `waited` so far (cudaStream_t as ints); the host "
        "does not wait.");
  py::class_<deepcomm::StreamPoint>(m, "StreamPoint", "The work queued on a stream so far (deepcomm.EventHandle).")
      .def(py::init<uintptr_t, int>(), py::arg("stream"), py::arg("device"))
      .def("wait", &deepcomm::StreamPoint::wait, py::arg("stream"))
      .def("synchronize", &deepcomm::StreamPoint::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("query", &deepcomm::StreamPoint::query);

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
         uintptr_t is_token_in_rank, int num_blocks, uintptr_t stream, uintptr_t num_invalid, uintptr_t send_pos) {
        deepcomm::DispatchLayoutArgs args{as_ptr<const int64_t>(topk_idx), num_tokens, num_topk, num_experts,
                                          num_ranks, ranks_per_node, as_ptr<int32_t>(num_tokens_per_rank),
                                          as_ptr<int32_t>(num_tokens_per_node), as_ptr<int32_t>(num_tokens_per_expert),
                                          as_ptr<bool>(is_token_in_rank), as_ptr<int32_t>(num_invalid),
                                          as_ptr<int32_t>(send_pos)};
        deepcomm::launch_dispatch_layout(args, num_blocks, as_stream(stream));
      },
      py::arg("topk_idx"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("num_experts"), py::arg("num_ranks"),
      py::arg("ranks_per_node"), py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_node"),
      py::arg("num_tokens_per_expert"), py::arg("is_token_in_rank"), py::arg("num_blocks"), py::arg("stream"),
      py::arg("num_invalid") = 0, py::arg("send_pos") = 0);

  m.def("copy", [](uintptr_t dst, uintptr_t src, int64_t bytes, int num_blocks, uintptr_t stream) {
    deepcomm::launch_copy(as_ptr<void>(dst), as_ptr<const void>(src), bytes, num_blocks, as_stream(stream));
  }, py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("num_blocks"), py::arg("stream"));
  m.def("bulk_copy", [](uintptr_t dst, uintptr_t src, int64_t bytes, int num_blocks, uintptr_t stream) {
    deepcomm::launch_bulk_copy(as_ptr<void>(dst), as_ptr<const void>(src), bytes, num_blocks, as_stream(stream));
  }, py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("num_blocks"), py::arg("stream"));

  m.attr("MAX_SORTED_EXPERTS") = deepcomm::kMaxSortedExperts;
  m.def("expert_order_blocks", &deepcomm::expert_order_blocks, py::arg("num_places"),
        "Rows of the [blocks, num_experts] int32 scratch expert_order needs.");
  m.def("expert_order", [](uintptr_t local_idx, int64_t num_places, int num_topk, int num_experts,
                           uintptr_t block_counts, int64_t num_pairs, uintptr_t order, uintptr_t rows,
                           uintptr_t ends, uintptr_t stream) {
    deepcomm::launch_expert_order({as_ptr<const int64_t>(local_idx), num_places, num_topk, num_experts,
                                   as_ptr<int32_t>(block_counts), num_pairs, as_ptr<int64_t>(order),
                                   as_ptr<int64_t>(rows), as_ptr<int32_t>(ends)},
                                  as_stream(stream));
  }, py::arg("local_idx"), py::arg("num_places"), py::arg("num_topk"), py::arg("num_experts"),
     py::arg("block_counts"), py::arg("num_pairs"), py::arg("order"), py::arg("rows"), py::arg("ends"),
     py::arg("stream"),
     "The places of local_idx's pairs (ids >= 0) by expert, then place, and their rows (deepcomm/expert_order.py).");

  m.def("pair_sum", [](uintptr_t out, uintptr_t values, uintptr_t pair_of, uintptr_t weights, int64_t num_rows,
                       int num_topk, int64_t hidden, uintptr_t stream) {
    deepcomm::launch_pair_sum({as_ptr<void>(out), as_ptr<const void>(values), as_ptr<const int64_t>(pair_of),
                               as_ptr<const float>(weights), num_rows, num_topk, hidden}, as_stream(stream));
  }, py::arg("out"), py::arg("values"), py::arg("pair_of"), py::arg("weights"), py::arg("num_rows"),
     py::arg("num_topk"), py::arg("hidden"), py::arg("stream"),
     "out[r] = bf16(sum over k, in order, of weights[r, k] * values[pair_of[r, k]]) in float32 (deepcomm/pair_sum.py).");

  namespace in = deepcomm::intranode;
  py::module_ intra = m.def_submodule("intranode", "intranode dispatch/combine kernels");
  intra.attr("MAX_RANKS") = in::kMaxRanks;
  intra.attr("MAX_EXPERTS") = in::kMaxExperts;
  intra.attr("DATA_OFFSET") = in::kDataOffset;
  intra.attr("MAILBOX_BYTES") = sizeof(in::HostMailbox);
  // int64 word index of each mailbox array
  intra.attr("MAILBOX_TOKENS_MATRIX") = offsetof(in::HostMailbox, tokens_matrix) / 8;
  intra.attr("MAILBOX_INVALID_IDS") = offsetof(in::HostMailbox, invalid_ids) / 8;
  intra.attr("MAILBOX_RECV_PER_EXPERT") = offsetof(in::HostMailbox, recv_tokens_per_expert) / 8;
  intra.attr("ERRORS") = py::dict(py::arg("timeout") = static_cast<int>(deepcomm::kErrorTimeout),
                                  py::arg("size_mismatch") = static_cast<int>(deepcomm::kErrorSizeMismatch),
                                  py::arg("invalid_ids") = static_cast<int>(deepcomm::kErrorInvalidIds),
                                  py::arg("mode_mismatch") = static_cast<int>(deepcomm::kErrorModeMismatch),
                                  py::arg("shape_mismatch") = static_cast<int>(deepcomm::kErrorShapeMismatch),
                                  py::arg("combine_mode_mismatch") =
                                      static_cast<int>(deepcomm::kErrorCombineModeMismatch));
  intra.attr("STAGES") = py::dict(py::arg("notify") = static_cast<int>(deepcomm::kStageNotify),
                                  py::arg("dispatch") = static_cast<int>(deepcomm::kStageDispatch),
                                  py::arg("combine_ready") = static_cast<int>(deepcomm::kStageCombineReady),
                                  py::arg("combine_done") = static_cast<int>(deepcomm::kStageCombineDone),
                                  py::arg("combine_landed") = static_cast<int>(deepcomm::kStageCombineLanded));
  intra.def("recv_layout", [](int64_t rows, int64_t x_row_bytes, int64_t scale_cols, int64_t num_topk) {
    const in::RecvLayout l = in::recv_layout(rows, x_row_bytes, scale_cols, num_topk);
    py::dict d;
    d["x"] = l.x;
    d["scales"] = l.scales;
    d["topk_idx"] = l.topk_idx;
    d["topk_weights"] = l.topk_weights;
    d["src_idx"] = l.src_idx;
    d["total_bytes"] = l.total_bytes;
    return d;
  });
  intra.def("require_stream_write_value", &deepcomm::driver::require_stream_write_value32,
            "Raises unless the driver offers cuStreamWriteValue32 (a pushing combine's chunk signals).");
  intra.def("wait_notify", [](uintptr_t mailbox, int64_t call, double timeout_s) {
    return static_cast<int>(deepcomm::wait_notify(mailbox, call, timeout_s));
  }, py::arg("mailbox"), py::arg("call"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>());

  // What a dispatch reads after wait_notify, in one crossing (numpy slices and sums of the mailbox cost
  // several µs of a decode-size call's host path): the first rank that passed invalid expert ids (-1: none)
  // and how many, the rows each rank receives, the rows this rank receives from each rank, and its entries
  // per local expert.
  intra.def("read_counts", [](uintptr_t mailbox, int num_ranks, int rank, int experts_per_rank) {
    DC_CHECK_ARG(num_ranks > 0 && num_ranks <= in::kMaxRanks, "num_ranks: in [1, " + std::to_string(in::kMaxRanks) + "]");
    DC_CHECK_ARG(rank >= 0 && rank < num_ranks, "rank: in [0, num_ranks)");
    DC_CHECK_ARG(experts_per_rank >= 0 && experts_per_rank <= in::kMaxExperts,
                 "experts_per_rank: in [0, " + std::to_string(in::kMaxExperts) + "]");
    DC_CHECK_ARG(mailbox != 0, "mailbox: a null address");
    const auto* box = as_ptr<const in::HostMailbox>(mailbox);
    int invalid_rank = -1;
    for (int r = 0; r < num_ranks && invalid_rank < 0; ++r)
      if (box->invalid_ids[r] != 0) invalid_rank = r;
    py::list totals(num_ranks), from_ranks(num_ranks), per_expert(experts_per_rank);
    for (int r = 0; r < num_ranks; ++r) {
      int64_t rows = 0;
      for (int src = 0; src < num_ranks; ++src) rows += box->tokens_matrix[src][r];
      totals[r] = rows;                            // rows rank r receives
      from_ranks[r] = box->tokens_matrix[r][rank];  // rows this rank receives from rank r
    }
    for (int e = 0; e < experts_per_rank; ++e) per_expert[e] = box->recv_tokens_per_expert[e];
    return py::make_tuple(invalid_rank, invalid_rank < 0 ? 0 : box->invalid_ids[invalid_rank], totals, from_ranks,
                          per_expert);
  }, py::arg("mailbox"), py::arg("num_ranks"), py::arg("rank"), py::arg("experts_per_rank"));

  py::class_<in::Context>(intra, "Context")
      .def(py::init([](const std::vector<uintptr_t>& regions, int rank, int num_slots, int64_t slot_bytes,
                       uintptr_t mailbox, int64_t timeout_ns) {
             DC_CHECK_ARG(!regions.empty() && regions.size() <= static_cast<size_t>(in::kMaxRanks),
                          "regions: one buffer per rank, at most " + std::to_string(in::kMaxRanks));
             in::Context ctx{};
             for (size_t r = 0; r < regions.size(); ++r) ctx.regions[r] = as_ptr<uint8_t>(regions[r]);
             ctx.rank = rank;
             ctx.num_ranks = static_cast<int>(regions.size());
             ctx.num_slots = num_slots;
             ctx.slot_bytes = slot_bytes;
             ctx.mailbox = as_ptr<in::HostMailbox>(mailbox);
             ctx.timeout_ns = timeout_ns;
             return ctx;
           }),
           py::arg("regions"), py::arg("rank"), py::arg("num_slots"), py::arg("slot_bytes"),
           py::arg("mailbox"), py::arg("timeout_ns"))
      .def("notify", [](const in::Context& ctx, uint64_t call, uint64_t call_shape, uintptr_t tokens_per_rank,
                        uintptr_t tokens_per_expert, uintptr_t num_invalid, int num_experts, uintptr_t send_base,
                        uintptr_t recv_totals, uintptr_t recv_tokens_per_expert, uintptr_t abort_dispatch,
                        uintptr_t stream) {
        in::NotifyArgs args{call, 0, call_shape, as_ptr<const int32_t>(tokens_per_rank),
                            as_ptr<const int32_t>(tokens_per_expert), as_ptr<const int32_t>(num_invalid), num_experts,
                            as_ptr<int32_t>(send_base), as_ptr<int32_t>(recv_totals),
                            as_ptr<int32_t>(recv_tokens_per_expert), as_ptr<int32_t>(abort_dispatch)};
        in::launch_notify(ctx, args, as_stream(stream));
      })
      .def("meet", [](const in::Context& ctx, uint64_t call, uint64_t reused_routing, uint64_t call_shape,
                      uintptr_t abort_dispatch, uintptr_t stream) {
        DC_CHECK_ARG(reused_routing > 0 && reused_routing < call, "reused_routing: the call of an earlier dispatch");
        in::NotifyArgs args{};
        args.call = call;
        args.reused_routing = reused_routing;
        args.call_shape = call_shape;
        args.abort_dispatch = as_ptr<int32_t>(abort_dispatch);
        in::launch_notify(ctx, args, as_stream(stream));
      }, py::arg("call"), py::arg("reused_routing"), py::arg("call_shape"), py::arg("abort_dispatch"),
         py::arg("stream"),
         "Notify for a dispatch that reuses the routing of call `reused_routing`: meet every peer (all must "
         "reuse that call's routing, with the same call_shape); abort_dispatch gets 1 if that fails.")
      .def("dispatch", [](const in::Context& ctx, uint64_t call, int slot, int payload, uintptr_t x, uintptr_t x_scales,
                          int hidden, uintptr_t topk_idx, uintptr_t topk_weights, int num_tokens, int num_topk,
                          int experts_per_rank, uintptr_t is_token_in_rank, uintptr_t send_pos, uintptr_t send_base,
                          uintptr_t recv_totals, uintptr_t abort_dispatch, int64_t expected_recv,
                          uint64_t arrivals_expected, int num_blocks, uintptr_t stream) {
        in::DispatchArgs args{call, slot, static_cast<in::Payload>(payload), as_ptr<const void>(x),
                              as_ptr<const float>(x_scales), hidden, as_ptr<const int64_t>(topk_idx),
                              as_ptr<const float>(topk_weights), num_tokens, num_topk, experts_per_rank,
                              as_ptr<const bool>(is_token_in_rank), as_ptr<const int32_t>(send_pos),
                              as_ptr<const int32_t>(send_base), as_ptr<const int32_t>(recv_totals),
                              as_ptr<const int32_t>(abort_dispatch), expected_recv, arrivals_expected, num_blocks};
        in::launch_dispatch(ctx, args, as_stream(stream));
      })
      .def("combine", [](const in::Context& ctx, uint64_t call, int64_t source_offset, uintptr_t y, int hidden,
                         int num_tokens, uintptr_t is_token_in_rank, uintptr_t send_pos, uintptr_t send_base,
                         uint64_t done_expected, int num_blocks, uintptr_t stream) {
        in::CombineArgs args{};
        args.call = call;
        args.source_offset = source_offset;
        fill_combine(args, y, hidden, num_tokens, is_token_in_rank, send_pos, send_base, done_expected, num_blocks);
        in::launch_combine(ctx, args, as_stream(stream));
      }, "Pull: every token's rows loaded from the ranks that hold them (source_offset: this rank's rows in its "
         "region).")
      .def("combine_pushed", [](const in::Context& ctx, uint64_t call, uintptr_t own_rows, int64_t landing_offset,
                                const std::vector<int64_t>& first_row,
                                const std::vector<int64_t>& num_rows, const std::vector<int64_t>& landing_row,
                                const std::vector<int32_t>& push_chunk_rows,
                                const std::vector<uint32_t>& push_chunks_before,
                                const std::vector<int64_t>& landing_first_row, const std::vector<int32_t>& chunk_rows,
                                const std::vector<uint32_t>& chunks_before, uintptr_t y, int hidden, int num_tokens,
                                uintptr_t is_token_in_rank, uintptr_t send_pos, uintptr_t send_base, int num_blocks,
                                uintptr_t stream, const std::vector<uintptr_t>& copy_streams) {
        DC_CHECK_ARG(own_rows != 0, "own_rows: null");
        in::PushArgs push{};
        copy_per_rank(ctx, first_row, push.first_row, "first_row");
        copy_per_rank(ctx, num_rows, push.num_rows, "num_rows");
        copy_per_rank(ctx, landing_row, push.landing_row, "landing_row");
        copy_per_rank(ctx, push_chunk_rows, push.chunk_rows, "push_chunk_rows");
        copy_per_rank(ctx, push_chunks_before, push.chunks_before, "push_chunks_before");
        in::CombineArgs args{};
        args.call = call;
        args.own_rows = as_ptr<const uint8_t>(own_rows);
        args.landing.offset = landing_offset;
        copy_per_rank(ctx, landing_first_row, args.landing.first_row, "landing_first_row");
        copy_per_rank(ctx, chunk_rows, args.landing.chunk_rows, "chunk_rows");
        copy_per_rank(ctx, chunks_before, args.landing.chunks_before, "chunks_before");
        fill_combine(args, y, hidden, num_tokens, is_token_in_rank, send_pos, send_base, 0, num_blocks);
        cudaStream_t per_owner[in::kMaxRanks] = {};
        copy_per_rank(ctx, copy_streams, per_owner, "copy_streams");
        in::launch_pushed_combine(ctx, args, push, as_stream(stream), per_owner);
      }, "Push: this rank's rows for every owner copied into its landing area by the copy engines (first_row, "
         "num_rows, landing_row, push_chunk_rows, push_chunks_before: per owner; on copy_streams[owner]), and "
         "every token of this rank summed from own_rows and its landing area once its chunks have landed "
         "(landing_first_row, chunk_rows, chunks_before: per peer).");
  bind_internode(m);
  bind_low_latency(m);

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
  nv.def("peer_pointer", &deepcomm::nvshmem::peer_pointer, py::arg("ptr"), py::arg("pe"));
  nv.def("barrier_all", &deepcomm::nvshmem::barrier_all);
  nv.def("ring_exchange", [](uintptr_t slot, uintptr_t stream) { deepcomm::nvshmem::ring_exchange(slot, as_stream(stream)); },
         py::arg("slot"), py::arg("stream"));
#endif
}
