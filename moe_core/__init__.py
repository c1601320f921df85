"""moe_core: the recursive Mixture-of-Experts / Mixture-of-Heads model.

Importing the package loads nothing else: the names below come from their modules on first use (PEP 562), so the
torch-free modules (the graph contract, the step loop, sessions, files) stay torch-free for serve.
"""

__version__ = "0.1.0"

# The end-of-text token of the tokenizers moe trains (id 0): the document separator in training data and
# the stop token of generation.
EOT = "<|endoftext|>"

_LAZY = {  # name -> the module that defines it
    "load_model": "checkpoint",
    "ModelConfig": "config",
    "CheckpointError": "common.errors",
    "ConfigError": "common.errors",
    "MoeError": "common.errors",
    "ModelOutput": "model",
    "RecursiveMoE": "model",
}

__all__ = ["EOT", "CheckpointError", "ConfigError", "ModelConfig", "ModelOutput", "MoeError", "RecursiveMoE",
           "load_model"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
