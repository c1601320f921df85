"""Typed, validated model config, and the dict -> dataclass loader shared by every config in the project."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .common.errors import ConfigError


def show(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: an error message stays one short line whatever the input."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; int is accepted where float is expected, nothing else."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {show(value)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {show(value)}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def from_dict(cls: type, data: dict[str, Any], where: str, validate: bool = True, complete: bool = False) -> Any:
    """Build dataclass `cls` from `data`, naming `where` (file and section) in every error.

    validate=False checks keys and types only (for one layer of a config that is merged later). complete=True
    demands every key (a file that moe wrote in full, such as a run's config.json: a missing key there means a
    damaged file, and a default would silently describe another model)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key {show(unknown[0])} (known keys: {', '.join(sorted(fields))})")
    optional = getattr(cls, "ADDED_LATER", ())  # older files lack these keys: their default is what they meant
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.name not in optional] \
        if complete else []
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing; expected every key of "
                          f"the {cls.__name__})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    if validate:
        obj.validate(where)
    return obj


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}.{msg}")


# Upper bounds that keep a hostile or mistyped config from asking for unbounded work before any weights are
# read: the rotary tables are max_seq_len long, the blocks are built one by one, the forward (and the exported
# graph) unrolls H_cycles * (L_cycles + 1) * halt_max_steps calls of the net.
MAX_SEQ_LEN = 1 << 16
MAX_LAYERS = 256
MAX_CYCLES = 64
MAX_BIAS_SEQ_LEN = 4096


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    max_seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    # Mixture-of-Heads attention: every head is a routing candidate; each token uses min_heads..max_heads.
    n_heads: int = 4
    min_heads: int = 1
    max_heads: int = 4
    # Mixture-of-Experts feed-forward: n_experts SwiGLU experts of hidden size d_expert, top_k per token.
    n_experts: int = 4
    top_k: int = 2
    d_expert: int = 256
    # How the experts are computed: "dense" runs every expert on every token (zero weight outside the top k),
    # "sparse" groups the routed (token, expert) pairs by expert and runs each expert on its own tokens only;
    # both give the same outputs. "auto" picks by the work sparse skips (moe_core.model.moe.resolve_moe_dispatch).
    moe_dispatch: str = "auto"
    # Recursion (TRM/HRM style). recursive = false is the plain MoE/MoH baseline with the same blocks.
    recursive: bool = True
    H_cycles: int = 2
    L_cycles: int = 2
    halt_max_steps: int = 3
    # TRM's trick: in training, all but the last H-cycle of a supervision step run without gradient.
    no_grad_cycles: bool = True
    causal: bool = True
    # A learned absolute position embedding added to the token embedding, besides rotary attention: on a grid
    # task it gives every cell its identity (row, column and box are then one lookup away).
    learned_pos: bool = False
    # A learned bias on the attention scores, per layer, head and (query, key) position pair (zero at start):
    # for fixed-size inputs, attention can then learn a fixed relational structure directly (on Sudoku: which
    # cells share a row, column or box), as TRM's token-mixing MLP does, instead of discovering it through the
    # query-key products of position embeddings. n_heads * max_seq_len^2 parameters per layer.
    attn_bias: bool = False
    # What mixes information across positions in each block: "moh" (the Mixture-of-Heads attention above) or
    # "mlp", TRM's token-mixing MLP: a SwiGLU across positions (max_seq_len -> 4 max_seq_len -> max_seq_len),
    # channel by channel, for inputs that always fill max_seq_len (a grid task; not causal). The MoE feed-forward
    # stays; the MoH settings are then unused.
    token_mixer: str = "moh"
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    # Keys a run's config.json may lack (written before they existed): learned_pos's and attn_bias's defaults are
    # what those runs had; moe_dispatch changes how the model computes, not what.
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("learned_pos", "attn_bias", "moe_dispatch", "token_mixer")
    MOE_DISPATCHES: ClassVar[tuple[str, ...]] = ("dense", "sparse", "auto")
    TOKEN_MIXERS: ClassVar[tuple[str, ...]] = ("moh", "mlp")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_steps(self) -> int:
        """Supervision steps the model runs (1 for the baseline)."""
        return self.halt_max_steps if self.recursive else 1

    def validate(self, where: str = "model") -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_experts", "top_k",
                     "d_expert", "min_heads", "max_heads", "H_cycles", "L_cycles", "halt_max_steps"):
            _check(getattr(self, name) >= 1, where, f"{name}: expected >= 1, got {getattr(self, name)}")
        for name, limit in (("max_seq_len", MAX_SEQ_LEN), ("n_layers", MAX_LAYERS), ("H_cycles", MAX_CYCLES),
                            ("L_cycles", MAX_CYCLES), ("halt_max_steps", MAX_CYCLES)):
            _check(getattr(self, name) <= limit, where, f"{name}: expected <= {limit}, got {getattr(self, name)}")
        _check(self.d_model % self.n_heads == 0, where,
               f"d_model: expected a multiple of n_heads={self.n_heads}, got {self.d_model}")
        _check(self.head_dim % 2 == 0, where,
               f"d_model: d_model / n_heads must be even for rotary embeddings, got {self.head_dim}")
        _check(self.top_k <= self.n_experts, where,
               f"top_k: expected <= n_experts={self.n_experts}, got {self.top_k}")
        _check(self.moe_dispatch in self.MOE_DISPATCHES, where,
               f"moe_dispatch: expected one of {', '.join(self.MOE_DISPATCHES)}, got {show(self.moe_dispatch)}")
        _check(self.min_heads <= self.max_heads, where,
               f"min_heads: expected <= max_heads={self.max_heads}, got {self.min_heads}")
        _check(self.max_heads <= self.n_heads, where,
               f"max_heads: expected <= n_heads={self.n_heads}, got {self.max_heads}")
        _check(not self.attn_bias or self.max_seq_len <= MAX_BIAS_SEQ_LEN, where,
               f"max_seq_len: expected <= {MAX_BIAS_SEQ_LEN} with attn_bias (a max_seq_len^2 table per head), "
               f"got {self.max_seq_len}")
        _check(self.token_mixer in self.TOKEN_MIXERS, where,
               f"token_mixer: expected one of {', '.join(self.TOKEN_MIXERS)}, got {show(self.token_mixer)}")
        if self.token_mixer == "mlp":
            _check(not self.causal, where, "causal: expected false with token_mixer = 'mlp' (its every output reads "
                   "every position)")
            _check(not self.attn_bias, where, "attn_bias: expected false with token_mixer = 'mlp' (no attention)")
            _check(self.max_seq_len <= MAX_BIAS_SEQ_LEN, where,
                   f"max_seq_len: expected <= {MAX_BIAS_SEQ_LEN} with token_mixer = 'mlp' (12 max_seq_len^2 "
                   f"weights per layer), got {self.max_seq_len}")
        _check(0.0 <= self.dropout < 1.0, where, f"dropout: expected in [0, 1), got {self.dropout}")
        _check(self.rope_theta > 0, where, f"rope_theta: expected > 0, got {self.rope_theta}")
        _check(self.norm_eps > 0, where, f"norm_eps: expected > 0, got {self.norm_eps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model", validate: bool = True,
                  complete: bool = False) -> ModelConfig:
        return from_dict(cls, data, where, validate, complete)
