"""GenARM: reward-guided decoding with autoregressive reward models (Xu et al., ICLR 2025)."""
from .config import ConfigError, load_config
from .engine import Completion, Engine, Pane, RequestError, SamplingOptions, Stream, TokenEvent
from .models import ModelLoadError, load_models

__all__ = ["ConfigError", "Completion", "Engine", "ModelLoadError", "Pane", "RequestError",
           "SamplingOptions", "Stream", "TokenEvent", "load_config", "load_models"]
