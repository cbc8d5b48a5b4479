"""deepcomm: expert-parallel dispatch and combine for Mixture-of-Experts models."""

from deepcomm import autograd, fp8, layout, reference, routing, topology
from deepcomm._ext import FeatureUnavailable, features
from deepcomm._version import __version__
from deepcomm.communicator import Communicator
from deepcomm.errors import CommunicationError, SlotReusedError
from deepcomm.events import EventHandle
from deepcomm.intranode import BufferConfig
from deepcomm.low_latency import LowLatencyConfig, LowLatencyResult
from deepcomm.results import DispatchResult

__all__ = [
    "BufferConfig",
    "Communicator",
    "CommunicationError",
    "DispatchResult",
    "EventHandle",
    "FeatureUnavailable",
    "LowLatencyConfig",
    "LowLatencyResult",
    "SlotReusedError",
    "__version__",
    "autograd",
    "features",
    "fp8",
    "layout",
    "reference",
    "routing",
    "topology",
]
