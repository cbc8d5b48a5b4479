"""tools/profile_dispatch.py --host-split: the arithmetic of the split, and the per-op timer on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import profile_dispatch  # noqa: E402


def test_host_split_is_the_median_of_each_part_over_calls():
    stamps = [(0, 1000, 3000, 4500), (10, 2010, 3010, 5010), (0, 1000, 5000, 6000)]
    assert profile_dispatch.host_split(stamps) == {"before": 1.0, "wait": 2.0, "after": 1.5, "call": 5.0}
    with pytest.raises(ValueError, match="^stamps:"):
        profile_dispatch.host_split([])


def test_the_wait_is_stamped_and_the_method_restored():
    class Impl:
        def __init__(self):
            self.waited = []

        def _wait_notify(self, call):
            self.waited.append(call)

    class Comm:
        def __init__(self):
            self._impl, self.calls = Impl(), 0

        def dispatch(self, *args, **kwargs):
            self.calls += 1
            self._impl._wait_notify(self.calls)

    comm = Comm()
    split, steps = profile_dispatch.run_host_split(comm, None, None, None, None, 8, iters=5)
    assert comm._impl.waited == [1, 2, 3, 4, 5] and split["call"] >= split["wait"] >= 0
    assert "_wait_notify" not in vars(comm._impl)
    assert steps == {}  # stretches only on the intranode backend


class _Context:
    def notify(self, *args):
        pass

    def dispatch(self, *args):
        pass


def _stub_intranode(fail_at: int | None = None):
    """An IntranodeCommunicator whose dispatch walks the stamped steps in order, on CPU."""
    import deepcomm.intranode as intranode

    class Stub(intranode.IntranodeCommunicator):
        def __init__(self):
            self.ctx, self.calls = _Context(), 0

        def _take_scratch(self):
            pass

        _new_scratch = _views = _finish = _take_scratch

        def _wait_notify(self, call):
            if call == fail_at:
                raise RuntimeError("peer gone")

        def run(self):
            self.calls += 1
            self._take_scratch()
            intranode.launch_dispatch_layout()
            self.ctx.notify()
            self.ctx.dispatch()
            intranode.hand_back()
            if self.calls % 4 == 1:
                self._new_scratch()  # one call in four allocates a spare
            self._wait_notify(self.calls)
            intranode.check_slot_sizes()
            self._views()
            self._finish()

    class Comm:
        def __init__(self):
            self._impl = Stub()

        def dispatch(self, *args, **kwargs):
            self._impl.run()

    return Comm()


def test_every_step_of_an_intranode_dispatch_is_stamped_and_everything_restored(monkeypatch):
    import deepcomm.intranode as intranode

    for name in profile_dispatch.STAMPED_FUNCTIONS:
        monkeypatch.setattr(intranode, name, lambda *args: None)
    originals = {name: getattr(intranode, name) for name in profile_dispatch.STAMPED_FUNCTIONS}
    comm = _stub_intranode()
    context = comm._impl.ctx
    split, steps = profile_dispatch.run_host_split(comm, None, None, None, None, 8, iters=4)
    assert split["call"] >= split["before"] + split["wait"] >= 0
    assert list(steps)[:4] == ["call … _take_scratch", "_take_scratch", "_take_scratch end … launch_dispatch_layout",
                               "launch_dispatch_layout"]
    assert {"notify", "dispatch", "hand_back", "_wait_notify", "_views", "_finish", "_finish end … return"} <= set(steps)
    assert "_new_scratch" in steps  # in one call of four: its median is over that call, not padded with zeros
    assert {name: getattr(intranode, name) for name in originals} == originals
    assert comm._impl.ctx is context and not set(vars(comm._impl)) - {"ctx", "calls"}

    failing = _stub_intranode(fail_at=6)  # in the second, fully stamped run
    with pytest.raises(RuntimeError, match="peer gone"):
        profile_dispatch.run_host_split(failing, None, None, None, None, 8, iters=4)
    assert {name: getattr(intranode, name) for name in originals} == originals
    assert not set(vars(failing._impl)) - {"ctx", "calls"} and isinstance(failing._impl.ctx, _Context)


def test_segments_name_each_stretch_by_what_ran_there():
    marks = [("call", 0), ("layout", 100), ("layout end", 300), ("hand_back", 350), ("hand_back end", 400),
             ("hand_back", 410), ("hand_back end", 470), ("return", 500)]
    assert profile_dispatch.segments(marks) == {
        "call … layout": 100, "layout": 200, "layout end … hand_back": 50, "hand_back": 50,
        "hand_back end … hand_back": 10, "hand_back #2": 60, "hand_back end … return": 30,
    }


def test_host_op_costs_on_cpu():
    costs = profile_dispatch.time_host_ops(torch.device("cpu"), rows=16, world_size=2, iters=20)
    assert "as_strided" in costs and "empty [16, 2] int32" in costs and all(us > 0 for us in costs.values())
    assert "record_stream" not in costs  # CUDA only


def test_host_functions_table_names_what_dispatch_calls(single_rank_group):
    """--host-functions: cProfile's table of real dispatch calls (the reference path on CPU here)."""
    import deepcomm

    comm = deepcomm.Communicator(single_rank_group, backend="reference")
    x = torch.randn(16, 256).to(torch.bfloat16)
    topk_idx = torch.randint(0, 8, (16, 4))
    weights = torch.rand(16, 4)
    table = profile_dispatch.profile_host_functions(comm, x, None, topk_idx, weights, 8, iters=3, top=40,
                                                    profiled=True)
    assert table.startswith("host functions of 3 dispatch calls") and "run_dispatch" in table
    assert profile_dispatch.profile_host_functions(comm, x, None, topk_idx, weights, 8, iters=1, top=5,
                                                   profiled=False) == ""
