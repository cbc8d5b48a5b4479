// pybind11 bindings of the internode kernels (deepcomm._C.internode):
// argument conversion only. Pointers and streams cross as Python ints.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <vector>

#include "kernels/internode.h"
#include "runtime/addresses.h"
#include "runtime/error.h"

namespace py = pybind11;
using deepcomm::as_ptr;
using deepcomm::as_stream;
namespace inter = deepcomm::internode;

namespace {

py::dict layout_dict(const inter::TransportLayout& t) {
  py::dict d;
  d["area_rows"] = t.area_rows;
  d["dispatch_stride"] = t.dispatch_stride;
  d["combine_stride"] = t.combine_stride;
  d["notify_ints"] = t.notify_ints;
  d["dispatch_recv"] = t.dispatch_recv;
  d["combine_recv"] = t.combine_recv;
  d["total_bytes"] = t.total_bytes;
  return d;
}

}  // namespace

void bind_internode(py::module_& m) {
  py::module_ mod = m.def_submodule("internode", "internode (hierarchical) dispatch/combine kernels");
  mod.attr("MAX_LOCAL_RANKS") = inter::kMaxLocalRanks;
  mod.attr("MAX_NODES") = inter::kMaxNodes;
  mod.attr("MAX_RANKS") = inter::kMaxRanks;
  mod.attr("MAX_CHANNELS") = inter::kMaxChannels;
  mod.attr("MAX_EXPERTS") = inter::kMaxExperts;
  mod.attr("NODE_DATA_OFFSET") = inter::kNodeDataOffset;
  mod.attr("MAILBOX_BYTES") = sizeof(inter::HostMailbox);
  // int64 word index of each mailbox array
  mod.attr("MAILBOX_RECV_FROM_RANK") = offsetof(inter::HostMailbox, recv_from_rank) / 8;
  mod.attr("MAILBOX_RECV_TOTALS") = offsetof(inter::HostMailbox, recv_totals) / 8;
  mod.attr("MAILBOX_INVALID_IDS") = offsetof(inter::HostMailbox, invalid_ids) / 8;
  mod.attr("MAILBOX_RECV_PER_EXPERT") = offsetof(inter::HostMailbox, recv_tokens_per_expert) / 8;
  mod.attr("TRAFFIC_COUNTERS") = std::vector<std::string>{"dispatch_boundary", "dispatch_nvlink_direct",
                                                          "dispatch_nvlink_forward", "combine_boundary",
                                                          "combine_nvlink"};
  mod.attr("TRANSPORTS") = py::dict(py::arg("ipc") = static_cast<int>(inter::TransportKind::kIpc),
                                    py::arg("nvshmem") = static_cast<int>(inter::TransportKind::kNvshmem));
  mod.def("num_channels", &inter::num_channels, py::arg("num_blocks"));
  mod.def("transport_layout", [](int num_ranks, int ranks_per_node, int64_t max_tokens, int64_t hidden, int num_topk) {
    DC_CHECK_ARG(num_ranks > 0 && ranks_per_node > 0 && num_ranks % ranks_per_node == 0,
                 "ranks_per_node: must divide num_ranks");
    return layout_dict(inter::transport_layout(num_ranks, ranks_per_node, max_tokens, hidden, num_topk));
  }, py::arg("num_ranks"), py::arg("ranks_per_node"), py::arg("max_tokens"), py::arg("hidden"), py::arg("num_topk"));
  mod.def("row_stride", [](int64_t x_bytes, int64_t scale_cols, int ranks_per_node, int num_topk) {
    return inter::row_format(x_bytes, scale_cols, ranks_per_node, num_topk).stride;
  }, py::arg("x_bytes"), py::arg("scale_cols"), py::arg("ranks_per_node"), py::arg("num_topk"));
  mod.def("slot_row_bytes", &inter::slot_row_bytes, py::arg("x_bytes"), py::arg("scale_cols"), py::arg("num_topk"));

  py::class_<inter::ContextDesc>(mod, "Context")
      .def(py::init([](int transport, const std::vector<uintptr_t>& transport_regions, bool staged,
                       const std::vector<uintptr_t>& node_regions, int rank, int num_ranks, int ranks_per_node,
                       int num_slots, int64_t slot_bytes, int64_t max_tokens, int hidden, int num_topk,
                       uintptr_t forward_rows, uintptr_t forward_counts, uintptr_t traffic, uintptr_t mailbox,
                       int64_t timeout_ns) {
             DC_CHECK_ARG(transport_regions.size() <= static_cast<size_t>(inter::kMaxRanks),
                          "transport_regions: at most " + std::to_string(inter::kMaxRanks));
             DC_CHECK_ARG(node_regions.size() == static_cast<size_t>(ranks_per_node) &&
                              node_regions.size() <= static_cast<size_t>(inter::kMaxLocalRanks),
                          "node_regions: one per rank of the node");
             inter::ContextDesc d{};
             d.transport = static_cast<inter::TransportKind>(transport);
             for (size_t r = 0; r < transport_regions.size(); ++r) d.transport_regions[r] = as_ptr<uint8_t>(transport_regions[r]);
             d.staged = staged;
             for (size_t l = 0; l < node_regions.size(); ++l) d.node_regions[l] = as_ptr<uint8_t>(node_regions[l]);
             d.rank = rank;
             d.num_ranks = num_ranks;
             d.ranks_per_node = ranks_per_node;
             d.num_slots = num_slots;
             d.slot_bytes = slot_bytes;
             d.max_tokens = max_tokens;
             d.hidden = hidden;
             d.num_topk = num_topk;
             d.forward_rows = as_ptr<int32_t>(forward_rows);
             d.forward_counts = as_ptr<int32_t>(forward_counts);
             d.traffic = as_ptr<int64_t>(traffic);
             d.mailbox = as_ptr<inter::HostMailbox>(mailbox);
             d.timeout_ns = timeout_ns;
             return d;
           }),
           py::arg("transport"), py::arg("transport_regions"), py::arg("staged"), py::arg("node_regions"),
           py::arg("rank"), py::arg("num_ranks"), py::arg("ranks_per_node"), py::arg("num_slots"),
           py::arg("slot_bytes"), py::arg("max_tokens"), py::arg("hidden"), py::arg("num_topk"),
           py::arg("forward_rows"), py::arg("forward_counts"), py::arg("traffic"), py::arg("mailbox"),
           py::arg("timeout_ns"))
      .def("notify", [](const inter::ContextDesc& d, uint64_t call, uint64_t call_shape, uintptr_t tokens_per_rank,
                        uintptr_t tokens_per_node, uintptr_t tokens_per_expert, uintptr_t num_invalid, int num_experts,
                        uintptr_t send_base, uintptr_t recv_totals, uintptr_t recv_tokens_per_expert,
                        uintptr_t abort_dispatch, uintptr_t stream) {
        inter::NotifyArgs args{call, call_shape, as_ptr<const int32_t>(tokens_per_rank),
                               as_ptr<const int32_t>(tokens_per_node),
                               as_ptr<const int32_t>(tokens_per_expert), as_ptr<const int32_t>(num_invalid),
                               num_experts, as_ptr<int32_t>(send_base), as_ptr<int32_t>(recv_totals),
                               as_ptr<int32_t>(recv_tokens_per_expert), as_ptr<int32_t>(abort_dispatch)};
        inter::launch_notify(d, args, as_stream(stream));
      })
      .def("dispatch", [](const inter::ContextDesc& d, uint64_t call, int slot, int payload, uintptr_t x,
                          uintptr_t x_scales, int hidden, uintptr_t topk_idx, uintptr_t topk_weights, int num_tokens,
                          int num_topk, int experts_per_rank, uintptr_t is_token_in_rank, uintptr_t send_pos,
                          uintptr_t send_base, uintptr_t recv_totals, uintptr_t abort_dispatch, int64_t expected_recv,
                          uint64_t arrivals_expected, int num_blocks, uintptr_t node_rows, uintptr_t stream) {
        inter::DispatchArgs args{call, slot, static_cast<inter::Payload>(payload), as_ptr<const void>(x),
                                 as_ptr<const float>(x_scales), hidden, as_ptr<const int64_t>(topk_idx),
                                 as_ptr<const float>(topk_weights), num_tokens, num_topk, experts_per_rank,
                                 as_ptr<const bool>(is_token_in_rank), as_ptr<const int32_t>(send_pos),
                                 as_ptr<const int32_t>(send_base), as_ptr<const int32_t>(recv_totals),
                                 as_ptr<const int32_t>(abort_dispatch), expected_recv, arrivals_expected, num_blocks,
                                 as_ptr<int32_t>(node_rows)};
        inter::launch_dispatch(d, args, as_stream(stream));
      })
      .def("combine", [](const inter::ContextDesc& d, uint64_t call, int slot, int dispatch_channels,
                         int64_t source_offset, uintptr_t y, int hidden, int num_tokens, uintptr_t is_token_in_rank,
                         uintptr_t send_pos, uintptr_t send_base, uintptr_t node_rows, uint64_t credit_expected,
                         uint64_t done_expected, int num_blocks, uintptr_t stream) {
        inter::CombineArgs args{call, slot, dispatch_channels, source_offset, as_ptr<void>(y), hidden, num_tokens,
                                as_ptr<const bool>(is_token_in_rank), as_ptr<const int32_t>(send_pos),
                                as_ptr<const int32_t>(send_base), as_ptr<const int32_t>(node_rows), credit_expected,
                                done_expected, num_blocks};
        inter::launch_combine(d, args, as_stream(stream));
      });
}
