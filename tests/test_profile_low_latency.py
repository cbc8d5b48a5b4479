"""tools/profile_low_latency.py: what can be checked without a GPU (kernel names as the profiler gives them)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import profile_low_latency as profile  # noqa: E402


def test_kernel_names_mangled_and_demangled_with_their_phase():
    mangled = ("_ZN8deepcomm11low_latency47_GLOBAL__N__f15305fc_14_low_latency_cu_6a66627215dispatch_kernelILNS_9"
               "intranode7PayloadE0ELb{}ELb{}EEEvNS0_7ContextENS0_12DispatchArgsENS1_8ChunkingES6_")
    assert profile.kernel_name(mangled.format(1, 0)) == "dispatch_kernel (send)"
    assert profile.kernel_name(mangled.format(0, 1)) == "dispatch_kernel (receive)"
    assert profile.kernel_name(mangled.format(1, 1)) == "dispatch_kernel"
    demangled = "void deepcomm::low_latency::(anonymous namespace)::dispatch_kernel<(deepcomm::intranode::Payload)2, {}, {}>(x)"
    assert profile.kernel_name(demangled.format("false", "true")) == "dispatch_kernel (receive)"
    assert profile.kernel_name("void ns::(anonymous namespace)::combine_recv_kernel<true>(ctx)") == "combine_recv_kernel"
    assert profile.kernel_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD (Device -> Device)"


def test_the_hook_option_parses():
    assert profile.parse_args(["--hook", "--fp8"]).hook and not profile.parse_args([]).hook
