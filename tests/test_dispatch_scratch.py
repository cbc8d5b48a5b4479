"""kernel_common.DispatchScratch: one allocation, carved into what one dispatch call writes."""

from __future__ import annotations

import pytest
import torch

from deepcomm.kernel_common import DispatchScratch


def extent(scratch: DispatchScratch, name: str, nbytes: int) -> tuple[int, int]:
    start = scratch.ptr[name] - scratch.words.data_ptr()
    return start, start + nbytes


@pytest.mark.parametrize("num_tokens,world,nodes,experts,node_rows", [
    (0, 2, 1, 8, False), (1, 2, 2, 8, True), (37, 4, 2, 64, True), (4096, 8, 1, 256, False), (129, 16, 4, 288, True)])
def test_regions_are_aligned_disjoint_and_inside_one_allocation(num_tokens, world, nodes, experts, node_rows):
    s = DispatchScratch(torch.device("cpu"), num_tokens, world, nodes, experts, with_node_rows=node_rows)
    sizes = {
        "per_rank": 4 * world, "per_node": 4 * nodes, "layout_per_expert": 4 * experts, "num_invalid": 4,
        "send_base": 4 * world, "recv_totals": 4 * world, "abort": 4,
        "send_pos": 4 * num_tokens * world, "is_token_in_rank": num_tokens * world,
    }
    if node_rows:
        sizes["node_rows"] = 4 * num_tokens * nodes
    spans = sorted(extent(s, name, nbytes) for name, nbytes in sizes.items())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[0][0] >= 0 and spans[-1][1] <= 4 * s.words.numel()
    # Back to back, so that the layout launch zeroes them in one memset.
    assert extent(s, "per_rank", 0)[0] + 4 * world == extent(s, "per_node", 0)[0]
    assert extent(s, "per_node", 0)[0] + 4 * nodes == extent(s, "layout_per_expert", 0)[0]
    assert extent(s, "layout_per_expert", 0)[0] + 4 * experts == extent(s, "num_invalid", 0)[0]
    for name in ("per_rank", "send_base", "recv_totals", "abort", "send_pos", "is_token_in_rank"):
        assert (s.ptr[name] - s.words.data_ptr()) % 16 == 0, name


def test_the_kept_tensors_are_views_at_their_pointers():
    s = DispatchScratch(torch.device("cpu"), 5, 4, 2, 16, with_node_rows=True)
    expected = {
        "send_base": (s.send_base, (4,), torch.int32), "recv_per_expert": (s.recv_per_expert, (4,), torch.int32),
        "send_pos": (s.send_pos, (5, 4), torch.int32), "node_rows": (s.node_rows, (5, 2), torch.int32),
        "is_token_in_rank": (s.is_token_in_rank, (5, 4), torch.bool),
    }
    for name, (tensor, shape, dtype) in expected.items():
        assert tensor.data_ptr() == s.ptr[name] and tuple(tensor.shape) == shape and tensor.dtype == dtype, name
        assert tensor.is_contiguous(), name
    # What the kernels write through the pointers is what the views read.
    s.words.zero_()
    s.words.view(torch.uint8)[s.ptr["is_token_in_rank"] - s.words.data_ptr() + 6] = 1
    assert s.is_token_in_rank.nonzero().tolist() == [[1, 2]]
    s.send_pos.fill_(3)
    assert int(s.words[(s.ptr["send_pos"] - s.words.data_ptr()) // 4 + 19]) == 3
    assert DispatchScratch(torch.device("cpu"), 5, 4, 2, 16, with_node_rows=False).node_rows is None
    # The per-expert counts a caller may keep pin only themselves.
    assert s.recv_per_expert.untyped_storage().data_ptr() != s.words.untyped_storage().data_ptr()


def test_handles_show_their_scratch_as_routing_views():
    """A handle keeps its dispatch's scratch; its routing tensors are views built when asked."""
    from deepcomm.internode import InternodeHandle
    from deepcomm.intranode import IntranodeHandle

    s = DispatchScratch(torch.device("cpu"), 5, 4, 2, 16, with_node_rows=True)
    s.words.zero_()
    s.send_pos.fill_(2)
    for handle in (IntranodeHandle(5, 8, 3, s, 1, 0, None, None), InternodeHandle(5, 8, 3, s, 0, 2, 1, 0)):
        assert handle.send_pos.data_ptr() == s.ptr["send_pos"] and bool((handle.send_pos == 2).all())
        assert handle.is_token_in_rank.data_ptr() == s.ptr["is_token_in_rank"]
        assert handle.send_base.data_ptr() == s.ptr["send_base"]
        assert handle.node_rows.data_ptr() == s.ptr["node_rows"]


def test_a_spare_scratch_serves_only_a_call_of_its_shape():
    """IntranodeCommunicator._take_scratch: the scratch allocated during the last wait, once, if it fits."""
    from types import SimpleNamespace

    from deepcomm.intranode import IntranodeCommunicator

    made = []

    def new_scratch(num_tokens, num_experts):
        made.append((num_tokens, num_experts))
        return DispatchScratch(torch.device("cpu"), num_tokens, 2, 1, num_experts, with_node_rows=False)

    comm = SimpleNamespace(_spare_scratch=None, _new_scratch=new_scratch)
    take = IntranodeCommunicator._take_scratch
    first = take(comm, 128, 64)  # no spare yet
    spare = comm._spare_scratch = new_scratch(128, 64)
    assert take(comm, 128, 64) is spare and comm._spare_scratch is None  # taken once
    assert take(comm, 128, 64) is not spare  # gone: a new one
    comm._spare_scratch = new_scratch(128, 64)
    other = take(comm, 100, 64)  # another shape: not the spare, which is dropped
    assert other.num_tokens == 100 and comm._spare_scratch is None
    assert first is not spare and len(made) == 5
    assert spare.fits(128, 64) and not spare.fits(128, 32) and not spare.fits(127, 64)
