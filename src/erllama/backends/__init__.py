"""Backend plugins: the ``ModelBackend`` hook specification, its ``hookimpl`` marker, and the
data types hooks exchange with the engine. See :mod:`erllama.backends.hookspecs`."""

from .hookspecs import ModelBackend as ModelBackend
from .hookspecs import hookimpl as hookimpl
from .hookspecs import hookspec as hookspec
from .types import ChatMessage as ChatMessage
from .types import Decode as Decode
from .types import LoadedModel as LoadedModel
from .types import Prefill as Prefill
from .types import Prefilled as Prefilled
from .types import Sampled as Sampled
from .types import StepOp as StepOp
from .types import StepResult as StepResult

__all__ = [
    "ChatMessage",
    "Decode",
    "LoadedModel",
    "ModelBackend",
    "Prefill",
    "Prefilled",
    "Sampled",
    "StepOp",
    "StepResult",
    "hookimpl",
    "hookspec",
]
