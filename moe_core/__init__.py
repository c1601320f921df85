"""moe_core: the recursive Mixture-of-Experts / Mixture-of-Heads model."""

__version__ = "0.1.0"

# The end-of-text token of the tokenizers moe trains (id 0): the document separator in training data and
# the stop token of generation.
EOT = "<|endoftext|>"

from .checkpoint import load_model  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .errors import CheckpointError, ConfigError, MoeError  # noqa: E402
from .model import ModelOutput, RecursiveMoE  # noqa: E402

__all__ = ["EOT", "CheckpointError", "ConfigError", "ModelConfig", "ModelOutput", "MoeError", "RecursiveMoE",
           "load_model"]
