"""CUDA IPC for torch tensors: share device memory with other processes of the host.

Ranks sharing one GPU (under MPS) or GPUs of one node open each other's
buffers this way. A tensor from torch's caching allocator may sit inside a
larger allocation; the export records the offset and opening applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepcomm import _ext


@dataclass(frozen=True)
class IpcTensorHandle:
    """Picklable description of an exported tensor (send it with all_gather_object)."""

    handle: bytes
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class _CudaArray:
    """Exposes raw device memory through __cuda_array_interface__ so torch can wrap it without a copy."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def export_tensor(tensor: torch.Tensor) -> IpcTensorHandle:
    """Export a contiguous CUDA tensor for other processes."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
        raise ValueError("tensor: expected a CUDA tensor")
    if not tensor.is_contiguous():
        raise ValueError("tensor: must be contiguous")
    handle, offset, _ = _ext.extension().ipc_export(tensor.data_ptr())
    return IpcTensorHandle(handle, offset, tensor.numel() * tensor.element_size(), tensor.dtype, tuple(tensor.shape))


class PeerTensor:
    """A peer's exported tensor opened in this process. ``close()`` unmaps it."""

    def __init__(self, exported: IpcTensorHandle, device: torch.device | int | None = None) -> None:
        core = _ext.extension()
        device = torch.device("cuda", torch.cuda.current_device() if device is None else torch.device(device).index)
        with torch.cuda.device(device):
            self._ptr = core.ipc_open(exported.handle, exported.offset)
        self._offset = exported.offset
        raw = torch.as_tensor(_CudaArray(self._ptr, exported.nbytes), device=device)
        self.tensor = raw.view(exported.dtype).view(exported.shape)

    def close(self) -> None:
        if self._ptr:
            self.tensor = None
            _ext.extension().ipc_close(self._ptr, self._offset)
            self._ptr = 0

    def __enter__(self) -> "PeerTensor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_peer_buffers(buffer: torch.Tensor, group, rank: int, ranks) -> tuple[list, list[int]]:
    """Every rank of ``group`` exports its ``buffer``; this one opens those of ``ranks`` (collective).

    Returns ``(peers, regions)`` in the order of ``ranks``: a PeerTensor per rank (None for this
    rank's own buffer) and each buffer's address here, as the kernels' contexts take them.
    """
    handles: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(handles, export_tensor(buffer), group=group)
    peers = [PeerTensor(handles[r], buffer.device) if r != rank else None for r in ranks]
    return peers, [buffer.data_ptr() if p is None else p.tensor.data_ptr() for p in peers]


def close_peers(peers: list) -> None:
    """Unmap every opened peer buffer (None entries are this rank's own)."""
    for peer in peers:
        if peer is not None:
            peer.close()
