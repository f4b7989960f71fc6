"""erllama: serve local GGUF models through llama.cpp from anyio programs, and keep prompts
warm with a token-exact, tiered KV cache.

    async with erllama.open_engine() as engine:
        mid = await engine.load_model("tiny", erllama.ModelConfig(model_path=path))
        result = await engine.complete(mid, "Once upon a time", max_tokens=32)
"""

from ._version import __version__ as __version__
from .cache.counters import CacheCounters as CacheCounters
from .config import CacheConfig as CacheConfig
from .config import CachePolicy as CachePolicy
from .config import EngineConfig as EngineConfig
from .config import ModelConfig as ModelConfig
from .config import PressureConfig as PressureConfig
from .config import SpeculativeConfig as SpeculativeConfig
from .config import ThinkingMarkers as ThinkingMarkers
from .config import ToolCallMarkers as ToolCallMarkers
from .config import load_config as load_config
from .engine import Engine as Engine
from .engine import open_engine as open_engine
from .errors import BackendError as BackendError
from .errors import CacheError as CacheError
from .errors import ConfigError as ConfigError
from .errors import ContextLengthExceeded as ContextLengthExceeded
from .errors import ErllamaError as ErllamaError
from .errors import InvalidRequest as InvalidRequest
from .errors import ModelAlreadyLoaded as ModelAlreadyLoaded
from .errors import ModelFailed as ModelFailed
from .errors import ModelLoading as ModelLoading
from .errors import ModelNotFound as ModelNotFound
from .errors import ModelUnloading as ModelUnloading
from .errors import NotSupported as NotSupported
from .errors import QueueFull as QueueFull
from .errors import SessionBusy as SessionBusy
from .errors import UnloadTimeout as UnloadTimeout
from .events import AdapterInfo as AdapterInfo
from .events import CacheDelta as CacheDelta
from .events import CachedPrefix as CachedPrefix
from .events import CachedRow as CachedRow
from .events import CacheExplanation as CacheExplanation
from .events import CacheHit as CacheHit
from .events import Completion as Completion
from .events import Done as Done
from .events import ModelInfo as ModelInfo
from .events import ModelState as ModelState
from .events import SessionInfo as SessionInfo
from .events import Stats as Stats
from .events import ThinkingDelta as ThinkingDelta
from .events import ThinkingEnd as ThinkingEnd
from .events import Token as Token
from .events import TokenLogprob as TokenLogprob
from .events import ToolCallDelta as ToolCallDelta
from .events import ToolCallEnd as ToolCallEnd
from .events import Verification as Verification
from .plugins import make_backend_registry as make_backend_registry
from .pressure import DeviceMemory as DeviceMemory
from .pressure import PressureResult as PressureResult
from .pressure import PressureSample as PressureSample
from .pressure import PressureStatus as PressureStatus
from .pressure import make_pressure_registry as make_pressure_registry
from .sampling import SamplerParams as SamplerParams
from .stream import InferStream as InferStream

__all__ = [
    "AdapterInfo",
    "BackendError",
    "CacheConfig",
    "CacheCounters",
    "CacheDelta",
    "CacheExplanation",
    "CacheError",
    "CacheHit",
    "CachedPrefix",
    "CachedRow",
    "CachePolicy",
    "Completion",
    "Verification",
    "ConfigError",
    "DeviceMemory",
    "Done",
    "Engine",
    "EngineConfig",
    "ErllamaError",
    "InferStream",
    "InvalidRequest",
    "ContextLengthExceeded",
    "ModelAlreadyLoaded",
    "ModelConfig",
    "ModelFailed",
    "ModelLoading",
    "ModelInfo",
    "ModelState",
    "ModelNotFound",
    "ModelUnloading",
    "NotSupported",
    "PressureConfig",
    "PressureResult",
    "PressureSample",
    "PressureStatus",
    "QueueFull",
    "SamplerParams",
    "SessionBusy",
    "UnloadTimeout",
    "SessionInfo",
    "Stats",
    "ThinkingDelta",
    "ThinkingEnd",
    "SpeculativeConfig",
    "ThinkingMarkers",
    "Token",
    "TokenLogprob",
    "ToolCallDelta",
    "ToolCallEnd",
    "ToolCallMarkers",
    "__version__",
    "load_config",
    "make_backend_registry",
    "make_pressure_registry",
    "open_engine",
]
