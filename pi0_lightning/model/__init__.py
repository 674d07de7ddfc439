"""PI0 / PI0.5 in plain PyTorch (no Lightning, no environment, no I/O beyond the checkpoint helpers)."""

from pi0_lightning.model.config import IMAGE_KEYS, GemmaConfig, PI0Config, SiglipConfig
from pi0_lightning.model.observation import Observation
from pi0_lightning.model.pi0 import PI0
from pi0_lightning.model.pi0_fast import PI0FAST, PI0FASTConfig

__all__ = ["IMAGE_KEYS", "GemmaConfig", "Observation", "PI0", "PI0Config", "PI0FAST", "PI0FASTConfig", "SiglipConfig"]
