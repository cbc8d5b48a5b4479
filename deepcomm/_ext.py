"""Loads the compiled core ``deepcomm._C`` and reports what this install can do.

The package installs as pure Python where no CUDA compiler was found (setup.py);
then every GPU feature is unavailable and ``features()`` says why, while the
reference path, routing, layout and benchmarks keep working on the CPU.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
from types import ModuleType

_C: ModuleType | None = None
_import_error: str | None = None


def _preload_nvshmem_host() -> None:
    """Load libnvshmem_host.so.3 from the installed nvidia-nvshmem wheel.

    The extension records the library by soname; loading it first from the
    wheel that is installed now makes the import independent of where the build
    happened (build trees, wheels, editable installs).
    """
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is None or not spec.submodule_search_locations:
        return
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "lib", "libnvshmem_host.so.3")
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return


def _load() -> None:
    global _C, _import_error
    try:
        _preload_nvshmem_host()
        _C = importlib.import_module("deepcomm._C")
    except (ImportError, OSError) as error:
        _C = None
        _import_error = f"{type(error).__name__}: {error}"


_load()


class FeatureUnavailable(RuntimeError):
    """A feature of the compiled core was asked for where it is not available."""


def available() -> bool:
    """Whether the compiled core imported."""
    return _C is not None


def extension() -> ModuleType:
    """The compiled module, or FeatureUnavailable saying why it is missing."""
    if _C is None:
        raise FeatureUnavailable(
            "deepcomm._C is not available in this install "
            f"({_import_error}); rebuild with a CUDA compiler on PATH: "
            "pip install --no-build-isolation -e ."
        )
    return _C


def features() -> dict[str, object]:
    """What this install supports, and the reason for each missing piece.

    Keys: ``extension`` (bool), ``extension_error`` (str or None), ``build``
    (the extension's build_info dict), ``nvshmem`` (bool), ``cuda_devices``
    (int, visible to the extension), ``reference`` (always True).
    """
    if _C is None:
        return {
            "extension": False,
            "extension_error": _import_error,
            "build": {},
            "nvshmem": False,
            "cuda_devices": 0,
            "reference": True,
        }
    build = dict(_C.build_info())
    return {
        "extension": True,
        "extension_error": None,
        "build": build,
        "nvshmem": bool(build.get("nvshmem")),
        "cuda_devices": _C.device_count(),
        "reference": True,
    }
