"""GenARM: reward-guided decoding with autoregressive reward models (Xu et al., ICLR 2025)."""
from .config import ConfigError, load_config
from .engine import Completion, Engine, Pane, Stream, TokenEvent
from .errors import GenarmError, RequestError
from .options import SamplingOptions
from .models import ModelLoadError, load_models

__all__ = ["ConfigError", "Completion", "Engine", "GenarmError", "ModelLoadError", "Pane", "RequestError",
           "SamplingOptions", "Stream", "TokenEvent", "load_config", "load_models"]
