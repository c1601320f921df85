"""Training config: a typed dataclass, TOML presets under configs/, and `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from moe_core.common.errors import ConfigError
from moe_core.common.jsonl import read_text_file
from moe_core.config import ModelConfig, _check, from_dict, show
from moe_core.tasks import TASKS

MAX_SEED = 2**63 - 1
DEVICES = ("auto", "cpu", "cuda")  # train.device: auto = CUDA when torch sees a GPU, else CPU
SUPERVISIONS = ("batch", "carry")  # train.supervision


def seed_for(*parts: int) -> int:
    """A seed derived from train.seed and stream numbers, e.g. seed_for(seed * 1_000_003, step): their sum,
    wrapped into the 64 bits torch's generators take (the plain sum for every sum below 2**64)."""
    return sum(parts) % 2**64


@dataclass
class TrainConfig:
    data: str | None = None  # .txt, folder of .txt, or .jsonl with "text"; None = the default corpus
    tokenizer: str | None = None  # a tokenizer.json to use instead of training a BPE on the data
    val_fraction: float = 0.1
    batch_size: int = 16
    max_steps: int = 300
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio
    warmup_frac: float = 0.2  # linear warmup over this fraction of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    router_lr_mult: float = 10.0  # LR multiplier for MoE/MoH routers and the MoH predictors
    # Weights of the aux losses in the backpropagated loss; each multiplies its loss's mean over the block calls
    # that backpropagate, every supervision step's (the no-grad cycles' calls are not in it:
    # moe_core.model.common.AuxAccumulator). The defaults are what the `default` preset trains best with of those
    # measured (docs/training.md, "Aux losses").
    moe_balance_weight: float = 0.0005
    moe_z_weight: float = 0.00005
    moh_balance_weight: float = 0.0005
    moh_complexity_weight: float = 0.0005
    moh_sparsity_weight: float = 0.00005
    halt_weight: float = 0.1
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 50  # steps between checkpoints in trainer_state/ (also at the end and on SIGINT/SIGTERM)
    keep_checkpoints: int = 3  # the last K checkpoints are kept, older ones are deleted
    plots: bool = True  # RUN_DIR/plots/*.png when the run ends (`moe plot RUN_DIR` draws them at any time)
    # An exponential moving average of the weights (0 = off), updated after every optimizer update with the decay
    # min(ema_decay, (1 + n) / (10 + n)) at the n-th update: a run shorter than ~10 / (1 - ema_decay) steps then
    # averages its recent weights instead of its random start. When on, the EMA weights are what the run is
    # evaluated with (eval records, keep_best) and what RUN_DIR/model.safetensors holds; the raw weights stay in
    # trainer_state/ for exact resume.
    ema_decay: float = 0.0
    # RUN_DIR/model.safetensors holds the weights of the best evaluation so far (the task's Task.best_by figures:
    # Sudoku whole-puzzle accuracy, then cell accuracy; language val loss) instead of the last checkpoint's; the
    # step and figures are in trainer_state/best/best.json.
    keep_best: bool = False
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or gradient (each skipped)
    seed: int = 1337
    compile: bool = True
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # under torchrun: ddp (weights on every rank) | fsdp (weights, grads, optimizer sharded)
    # task: one of moe_core.tasks.TASKS. lm: language modelling on `data` | sudoku: one token per cell
    # (configs/sudoku*.toml), its data set in the run's [sudoku] section (moe_core.tasks.config)
    task: str = "lm"
    # Deep supervision of a recursive model. "batch": every supervision step (model.halt_max_steps of them) runs
    # on the step's batch inside one forward, and one update follows; no row halts. "carry" (TRM's scheme): one
    # update per supervision step; each row keeps its carry (z_H, z_L) and its puzzle across updates until it
    # halts (its halt logit > 0, or carry_steps steps taken), and halted rows are refilled from the step's batch.
    # With probability halt_explore a new row gets a random minimum of 2..carry_steps steps before it may halt.
    # carry_steps is model.halt_max_steps, or grows linearly from carry_steps_start (0 = no schedule) to it over
    # the first carry_ramp_frac of max_steps. A step is an update in both modes: max_steps counts updates.
    supervision: str = "batch"
    halt_explore: float = 0.1
    carry_steps_start: int = 0
    carry_ramp_frac: float = 0.5

    def validate(self, where: str = "train") -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                     "keep_checkpoints", "max_bad_steps"):
            _check(getattr(self, name) >= 1, where, f"{name}: expected >= 1, got {getattr(self, name)}")
        _check(0.0 < self.val_fraction <= 0.5, where, f"val_fraction: expected in (0, 0.5], got {self.val_fraction}")
        _check(self.lr > 0, where, f"lr: expected > 0, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, where, f"min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        _check(0.0 <= self.warmup_frac <= 1.0, where, f"warmup_frac: expected in [0, 1], got {self.warmup_frac}")
        _check(self.grad_clip >= 0, where, f"grad_clip: expected >= 0 (0 = off), got {self.grad_clip}")
        _check(self.router_lr_mult > 0, where, f"router_lr_mult: expected > 0, got {self.router_lr_mult}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, where, "beta1/beta2: expected in [0, 1)")
        for f in dataclasses.fields(self):
            if f.name.endswith("_weight"):
                _check(getattr(self, f.name) >= 0, where, f"{f.name}: expected >= 0, got {getattr(self, f.name)}")
        _check(self.device in DEVICES, where,
               f"device: expected auto, cpu or cuda, got {show(self.device)}")
        _check(self.parallel in ("ddp", "fsdp"), where, f"parallel: expected ddp or fsdp, got {show(self.parallel)}")
        _check(self.task in TASKS, where, f"task: expected {' or '.join(TASKS)}, got {show(self.task)}")
        _check(self.supervision in SUPERVISIONS, where,
               f"supervision: expected {' or '.join(SUPERVISIONS)}, got {show(self.supervision)}")
        _check(0.0 <= self.halt_explore <= 1.0, where, f"halt_explore: expected in [0, 1], got {self.halt_explore}")
        _check(self.carry_steps_start >= 0, where,
               f"carry_steps_start: expected >= 0 (0 = no schedule), got {self.carry_steps_start}")
        _check(0.0 < self.carry_ramp_frac <= 1.0, where,
               f"carry_ramp_frac: expected in (0, 1], got {self.carry_ramp_frac}")
        _check(0.0 <= self.ema_decay < 1.0, where, f"ema_decay: expected in [0, 1) (0 = off), got {self.ema_decay}")
        for name, on in (("ema_decay", self.ema_decay > 0), ("keep_best", self.keep_best)):
            # FSDP shards the weights over the ranks: neither the average nor the best weights have a whole copy
            _check(not (on and self.parallel == "fsdp"), where,
                   f"{name}: expected it off with parallel = 'fsdp' (only a whole model is averaged and kept)")
        # torch seeds its generators with a 64-bit integer; the streams derived from the seed (per step, per rank)
        # are taken modulo 2**64 (see seed_for), so every seed in this range gives a run.
        _check(0 <= self.seed <= MAX_SEED, where, f"seed: expected an integer in 0..{MAX_SEED}, got {show(self.seed)}")

    @property
    def aux_weights(self) -> dict[str, float]:
        """Weight of each aux loss the model returns, by the model's name for it."""
        return {name: getattr(self, f"{name}_weight")
                for name in ("moe_balance", "moe_z", "moh_balance", "moh_complexity", "moh_sparsity")}


# The sections a run's config may hold: [model], [train] and the section of train.task's own settings, named after
# the task (TaskSpec.config: [sudoku]).
TASK_SECTIONS: dict[str, type] = {name: spec.config for name, spec in TASKS.items() if spec.config is not None}
SECTIONS = ("model", "train", *TASK_SECTIONS)
SECTIONS_TEXT = ", ".join(f"[{s}]" for s in SECTIONS)
CONFIG_FILE_HELP = f"TOML file of config sections ({SECTIONS_TEXT}), applied over the preset."


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The settings of train.task's own section (a TaskSpec.config instance), None for a task without one.
    task_config: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), **self.run_sections()}

    def run_sections(self) -> dict[str, Any]:
        """Every section but [model]: what config.json holds beside the model's own section."""
        task = {} if self.task_config is None else {self.train.task: dataclasses.asdict(self.task_config)}
        return {"train": dataclasses.asdict(self.train), **task}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str, validate: bool = True) -> RunConfig:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{where}: unknown section {show(unknown[0])} (expected {SECTIONS_TEXT})")
        data = _task_keys_in_their_section(data)
        model = ModelConfig.from_dict(data.get("model", {}), f"{where}: model", validate)
        tc = from_dict(TrainConfig, data.get("train", {}), f"{where}: train", validate)
        sections = {s: from_dict(TASK_SECTIONS[s], data[s], f"{where}: {s}", validate=False)
                    for s in TASK_SECTIONS if s in data}  # keys and types, named with their file
        task_config = None
        if validate:
            other = next((s for s in sections if s != tc.task), None)
            _check(other is None, f"{where}: train", f"task: expected {show(other)} with a [{other}] section, got "
                   f"{show(tc.task)}")
            if tc.task in TASK_SECTIONS:
                task_config = sections.get(tc.task) or TASK_SECTIONS[tc.task]()
                task_config.validate(f"{where}: {tc.task}")
        cfg = cls(model, tc, task_config)
        if validate and tc.supervision == "carry":
            mc = cfg.model
            _check(mc.recursive, f"{where}: train", "supervision: expected 'batch' with model.recursive = false "
                   "(the baseline has no carry)")
            # a row halts when its answer is right: a target known at each step. Language's halt target (does the
            # next step lower the loss) is known only an update later.
            _check(TASKS[tc.task].carry, f"{where}: train", f"supervision: expected 'batch' for task = "
                   f"{show(tc.task)} ('carry' needs a task whose halt target is known at each step: "
                   f"{', '.join(t.name for t in TASKS.values() if t.carry)})")
            _check(tc.carry_steps_start <= mc.halt_max_steps, f"{where}: train",
                   f"carry_steps_start: expected at most model.halt_max_steps = {mc.halt_max_steps}, got "
                   f"{tc.carry_steps_start}")
        return cfg


def _legacy_task_key(key: str) -> tuple[str, str] | None:
    """(section, key) for a [train] key named `<task>_<key>`: runs and config files written before tasks had their
    own sections spell [sudoku] val as train.sudoku_val."""
    for s, section in TASK_SECTIONS.items():
        if key.startswith(f"{s}_") and key[len(s) + 1:] in {f.name for f in dataclasses.fields(section)}:
            return s, key[len(s) + 1:]
    return None


def _task_keys_in_their_section(data: dict[str, Any], task: Any = None) -> dict[str, Any]:
    """`data` with the [train] keys of _legacy_task_key moved to their section, for a run of `task` (default: the
    data's train.task). A key the section itself sets wins; an old run of another task saved them too (every field
    was saved), and they meant nothing there."""
    train = data.get("train")
    if not isinstance(train, dict):
        return data
    task = train.get("task", TrainConfig.task) if task is None else task
    moved: dict[str, dict[str, Any]] = {}
    out = {**data, "train": {}}
    for k, v in train.items():
        if isinstance(k, str) and (legacy := _legacy_task_key(k)) is not None:
            moved.setdefault(legacy[0], {})[legacy[1]] = v
        else:
            out["train"][k] = v
    if not moved:
        return data
    for s, values in moved.items():
        if s == task or s in data:
            section = data.get(s)
            out[s] = {**values, **(section if isinstance(section, dict) else {})}
    return out


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """`cfg` with train.data and train.tokenizer made absolute against the current directory, as a new run
    records them: `--resume` from any other directory then reads the same files. (A run saved with a relative
    path keeps it, and resolves it against the directory it is resumed from.)"""
    tc = cfg.train
    # field name -> new value (a str); Any: dataclasses.replace types each keyword by its field, not a dict's values
    absolute: dict[str, Any] = {name: os.path.abspath(value) for name in ("data", "tokenizer")
                                if isinstance(value := getattr(tc, name), str) and value}
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, **absolute)) if absolute else cfg


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("train.configs").iterdir()
                  if p.name.endswith(".toml"))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_text_file(path, "config file", error=ConfigError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML (nested too deeply)") from None


def load_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"--preset: unknown preset {show(name)} (available: {', '.join(preset_names())})")
    with resources.as_file(resources.files("train.configs") / f"{name}.toml") as path:
        return read_toml(path)


def parse_override(item: str) -> tuple[str, str, Any]:
    """'model.d_model=64' or 'lr=1e-3' -> (section, key, value); values are TOML literals, else strings."""
    if "=" not in item:
        raise ConfigError(f"--set {show(item)}: expected key=value, e.g. --set model.d_model=64")
    key, raw = (s.strip() for s in item.split("=", 1))
    if "." in key:
        section, key = key.split(".", 1)
        if section == "train" and (legacy := _legacy_task_key(key)) is not None:
            section, key = legacy
    else:
        sections = [s for s, cls in (("model", ModelConfig), ("train", TrainConfig))
                    if key in {f.name for f in dataclasses.fields(cls)}]
        if not sections:
            raise ConfigError(f"--set {show(item)}: unknown key {show(key)} (use model.KEY or train.KEY)")
        section = sections[0]
    if section not in SECTIONS:
        raise ConfigError(f"--set {show(item)}: unknown section {show(section)} (expected {' or '.join(SECTIONS)})")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw  # bare words are strings: --set data=corpus.txt
    return section, key, value


def build_config(preset: str | None, config_file: str | None, overrides: list[str]) -> RunConfig:
    """Dataclass defaults <- preset <- config file <- --set overrides, validated as a whole."""
    data: dict[str, dict[str, Any]] = {"model": {}, "train": {}}  # and a task's section where one is set
    layers = []
    if preset is not None:
        layers.append((load_preset(preset), f"preset {preset!r}"))
    if config_file is not None:
        layers.append((read_toml(config_file), str(config_file)))
    for layer, where in layers:
        # a layer's old train.<task>_KEY settings belong to the task the layers chose so far, or this one's
        train = given if isinstance(given := layer.get("train"), dict) else {}
        layer = _task_keys_in_their_section(layer, train.get("task", data["train"].get("task", TrainConfig.task)))
        RunConfig.from_dict(layer, where, validate=False)  # a bad key or type is named with its file
        for section, values in layer.items():
            data.setdefault(section, {}).update(values)
    for item in overrides:
        section, key, value = parse_override(item)
        data.setdefault(section, {})[key] = value
    return RunConfig.from_dict(data, "config")
