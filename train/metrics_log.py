"""What a run logs: metrics.jsonl (one JSON object per line) and, when the optional `tensorboard` package is
installed, the same numbers as TensorBoard scalars under RUN_DIR/tensorboard/."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moe_core.common.files import atomic_write_text
from moe_core.run_layout import TENSORBOARD_DIR

from .checkpointing import read_metrics_until


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written so a killed run keeps what it logged.

    A resumed run keeps the records up to its checkpoint's step (dropping a torn last line and whatever the
    killed run logged after the checkpoint), so the file reads as if the run had never stopped.
    """

    def __init__(self, path: Path, keep_until: int | None = None, files: bool = True) -> None:
        self.path, self.files = path, files  # files=False on ranks other than 0: track, write nothing
        lines = read_metrics_until(path, keep_until)[0] if keep_until is not None and files else []
        records = [json.loads(line) for line in lines]
        self.eval_steps = {r["step"] for r in records if r.get("kind") == "eval"}
        self.last_eval = next((r for r in reversed(records) if r.get("kind") == "eval"), None)
        self.tensorboard = None
        if files:
            atomic_write_text(path, "".join(line + "\n" for line in lines))
            self.tensorboard = _tensorboard_writer(path.parent / TENSORBOARD_DIR, purge_step=(keep_until or 0) + 1)

    def has_eval_at(self, step: int) -> bool:
        return step in self.eval_steps

    def write(self, record: dict[str, Any]) -> None:
        if self.files:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if record.get("kind") == "eval":
            self.eval_steps.add(record["step"])
            self.last_eval = record
        if self.tensorboard is not None and record.get("kind") in ("train", "eval"):
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values):
                    if isinstance(v, (int, float)) and key != "step":
                        name = f"{record['kind']}/{key}" + (f"/{i}" if isinstance(value, list) else "")
                        self.tensorboard.add_scalar(name, v, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard_writer(log_dir: Path, purge_step: int) -> Any:
    """A SummaryWriter when the optional `tensorboard` package is installed (pip install 'moe[tensorboard]').

    On resume, purge_step drops the events a killed run logged after its checkpoint, as metrics.jsonl does.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def to_record(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        v = v.detach().float().cpu()
        out[k] = round(v.item(), 6) if v.dim() == 0 else [round(x, 6) for x in v.reshape(-1).tolist()]
    return out
