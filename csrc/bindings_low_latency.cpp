// pybind11 bindings of the low-latency kernels (deepcomm._C.low_latency):
// argument conversion only. Pointers and streams cross as Python ints.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "kernels/low_latency.h"
#include "runtime/addresses.h"
#include "runtime/error.h"

namespace py = pybind11;
using deepcomm::as_ptr;
using deepcomm::as_stream;
namespace ll = deepcomm::low_latency;

namespace {

ll::Phases phases_of(int phases) {
  DC_CHECK_ARG(phases >= 1 && phases <= 3, "phases: 1 (send), 2 (receive) or 3 (both)");
  return static_cast<ll::Phases>(phases);
}

}  // namespace

void bind_low_latency(py::module_& m) {
  py::module_ mod = m.def_submodule("low_latency", "low-latency (decode) dispatch/combine kernels");
  mod.attr("MAX_RANKS") = ll::kMaxRanks;
  mod.attr("MAX_EXPERTS") = ll::kMaxExperts;
  mod.attr("MAX_TOPK") = ll::kMaxTopk;
  mod.attr("NUM_AREAS") = ll::kNumAreas;
  mod.attr("SEND") = static_cast<int>(ll::Phases::kSend);
  mod.attr("RECEIVE") = static_cast<int>(ll::Phases::kReceive);
  mod.attr("BOTH") = static_cast<int>(ll::Phases::kBoth);
  mod.attr("DATA_OFFSET") = ll::kDataOffset;
  mod.attr("MAILBOX_BYTES") = sizeof(ll::HostMailbox);
  mod.attr("STAGES") = py::dict(py::arg("low_latency_staging") = static_cast<int>(deepcomm::kStageLowLatencyStaging),
                                py::arg("low_latency_rows") = static_cast<int>(deepcomm::kStageLowLatencyRows),
                                py::arg("low_latency_outputs") = static_cast<int>(deepcomm::kStageLowLatencyOutputs),
                                py::arg("low_latency_partials") = static_cast<int>(deepcomm::kStageLowLatencyPartials));
  mod.attr("STATIC_SHARED_BOUND") = ll::kStaticSharedBound;
  // The phase clock's phases in index order (csrc/kernels/low_latency.h Phase) and the blocks it keeps.
  mod.attr("PHASES") = std::vector<std::string>{"start", "routed", "staging free", "rows sent", "rows signalled",
                                                "rows arrived", "places added", "rows placed", "end",
                                                "combine start", "outputs ready", "partials sent", "partials arrived", "summed"};
  static_assert(ll::kNumPhases == 14, "PHASES names every phase");
  mod.attr("PHASE_BLOCKS") = ll::kPhaseBlocks;
  mod.def("dispatch_shared_bytes", &ll::dispatch_shared_bytes, py::arg("num_experts"), py::arg("max_tokens"),
          "Shared memory the send kernel needs (routing masks), to check a configuration.");
  mod.def("area_layout", [](int64_t local_experts, int64_t num_ranks, int64_t max_tokens, int64_t hidden) {
    const ll::AreaLayout l = ll::area_layout(local_experts, num_ranks, max_tokens, hidden);
    py::dict d;
    d["rows_per_expert"] = l.rows_per_expert;
    d["row_stride"] = l.row_stride;
    d["scales"] = l.scales;
    d["staged"] = l.staged;
    d["staged_scales"] = l.staged_scales;
    d["partials"] = l.partials;
    d["staging_tags"] = l.staging_tags;
    d["staged_weights"] = l.staged_weights;
    d["reduce_entries"] = l.reduce_entries;
    d["total_bytes"] = l.total_bytes;
    return d;
  }, py::arg("local_experts"), py::arg("num_ranks"), py::arg("max_tokens"), py::arg("hidden"));

  py::class_<ll::Context>(mod, "Context")
      .def(py::init([](const std::vector<uintptr_t>& regions, int rank, int num_experts, int max_tokens, int hidden,
                       uintptr_t mailbox, int64_t timeout_ns) {
             DC_CHECK_ARG(!regions.empty() && regions.size() <= static_cast<size_t>(ll::kMaxRanks),
                          "regions: one buffer per rank, at most " + std::to_string(ll::kMaxRanks));
             ll::Context ctx{};
             for (size_t r = 0; r < regions.size(); ++r) ctx.regions[r] = as_ptr<uint8_t>(regions[r]);
             ctx.rank = rank;
             ctx.num_ranks = static_cast<int>(regions.size());
             ctx.num_experts = num_experts;
             ctx.max_tokens = max_tokens;
             ctx.hidden = hidden;
             ctx.mailbox = as_ptr<ll::HostMailbox>(mailbox);
             ctx.timeout_ns = timeout_ns;
             return ctx;
           }),
           py::arg("regions"), py::arg("rank"), py::arg("num_experts"), py::arg("max_tokens"), py::arg("hidden"),
           py::arg("mailbox"), py::arg("timeout_ns"))
      .def("set_early_launch", [](ll::Context& ctx, bool on, int device) {
        ctx.early_launch = on && ll::can_launch_early(device);
        return ctx.early_launch;
      }, py::arg("on"), py::arg("device"),
         "Launch every later call's kernels early (programmatic dependent launch) where the kernels as `device` "
         "runs them wait for the kernel before (built for sm_90 on): their blocks may be placed while that kernel "
         "still runs. Returns whether they will be.")
      .def("record_phases", [](ll::Context& ctx, uintptr_t clock, int slots) {
        DC_CHECK_ARG(clock == 0 || slots > 0, "slots: must be > 0");
        ctx.phase_clock = as_ptr<uint64_t>(clock);
        ctx.phase_slots = clock == 0 ? 0 : slots;
      }, py::arg("clock"), py::arg("slots"),
         "Stamp every later call's phases into clock ([slots, PHASE_BLOCKS, len(PHASES)] int64 on the device; "
         "0: stop).")
      .def("dispatch", [](const ll::Context& ctx, int phases, int area, int payload, uintptr_t x, uintptr_t x_scales,
                          uintptr_t topk_idx, uintptr_t topk_weights, bool with_weights, int num_tokens, int num_topk,
                          uintptr_t pair_rows, uintptr_t recv_counts, int num_blocks, uintptr_t stream) {
        ll::DispatchArgs args{area, static_cast<ll::Payload>(payload), as_ptr<const void>(x),
                              as_ptr<const float>(x_scales), as_ptr<const int64_t>(topk_idx),
                              as_ptr<const float>(topk_weights), with_weights, num_tokens, num_topk,
                              as_ptr<int32_t>(pair_rows), as_ptr<int32_t>(recv_counts), num_blocks};
        ll::launch_dispatch(ctx, args, phases_of(phases), as_stream(stream));
      }, py::arg("phases"), py::arg("area"), py::arg("payload"), py::arg("x"), py::arg("x_scales"),
         py::arg("topk_idx"), py::arg("topk_weights"), py::arg("with_weights"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("pair_rows"),
         py::arg("recv_counts"), py::arg("num_blocks"), py::arg("stream"),
         "phases: 1 send, 2 receive, 3 both (csrc/kernels/low_latency.h); with_weights: topk_weights travel with the "
         "rows (the combine then sums at the owners).")
      .def("stage_outputs", [](const ll::Context& ctx, int area, uintptr_t outputs, uintptr_t recv_counts,
                               int num_blocks, uintptr_t stream) {
        ll::launch_stage_outputs(ctx, area, as_ptr<const void>(outputs), as_ptr<const int32_t>(recv_counts),
                                 num_blocks, as_stream(stream));
      }, py::arg("area"), py::arg("outputs"), py::arg("recv_counts"), py::arg("num_blocks"), py::arg("stream"))
      .def("combine", [](const ll::Context& ctx, int phases, int area, bool owner_sums, uintptr_t outputs,
                         uintptr_t pair_rows, uintptr_t topk_weights, int num_tokens, int num_topk, uintptr_t y,
                         int num_blocks, uintptr_t stream) {
        ll::CombineArgs args{area, as_ptr<const void>(outputs), as_ptr<const int32_t>(pair_rows),
                             as_ptr<const float>(topk_weights), owner_sums, num_tokens, num_topk, as_ptr<void>(y),
                             num_blocks};
        ll::launch_combine(ctx, args, phases_of(phases), as_stream(stream));
      }, py::arg("phases"), py::arg("area"), py::arg("owner_sums"), py::arg("outputs"), py::arg("pair_rows"),
         py::arg("topk_weights"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("y"), py::arg("num_blocks"),
         py::arg("stream"), "owner_sums: the dispatch carried the weights (sums at the owners over outputs); else the pull.");
}
