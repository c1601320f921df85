"""`python -m benchmarks [--quick | --smoke] [--run RUN_DIR [--onnx MODEL.onnx]] [--out DIR] [--threads N]
[--only SECTIONS]`: the whole suite in one process, a table on stdout, DIR/results[-MODE].json and
DIR/scaling[-MODE].png.

Modes:
  full   (default) the `default` preset's model (random init, or the trained --run), the serving grid
         batch {1, 8, 32} x seq {32, 128}, the preset's training batch, the MoE layer dense vs sparse at 4 experts
         top-2, 8 top-2 and 8 top-1 (16 x 128 tokens), scaling over 4-5 points per factor; generation at batch
         {1, 8, 32} x prompts of {16, 112} tokens, 64 new tokens (uncached: fewer at batch 8 and 32, stated in the
         output).
  quick  the default preset's block widths with the recursion cut to H1 x L1 x 1 step, so that the ONNX exports
         (the time goes into tracing, which grows with the unrolled net calls) stay short; scoring batch {1, 32} at
         seq 128, 3 points per factor, generation at batch {1, 32} x 112-token prompts, 16 new tokens. torch.compile
         still compiles (its cost is reported apart; much less from the inductor cache under /tmp).
  smoke  (seconds) a micro model through every section, torch.compile with the eager backend (dynamo only): checks the
         plumbing (the test suite runs it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from export.decode import can_decode
from moe_core import load_model
from moe_core.common.files import atomic_write_text
from moe_core.model import RecursiveMoE
from serve.runtime import OrtModel
from train.checkpointing import saved_run_config
from train.config import RunConfig, build_config

from .flops import PEAK, flops_summary, matmul_peak, measure_routing
from .generation import generation_section, opset_of
from .halting import halting_section
from .report import notes, ratios, table
from .scaling import plot, scaling
from .suites import export_graphs, moe_dispatch, random_batch, serving, training
from .timing import cpu_use, machine_info, set_threads, source_tree

SECTIONS = ("serving", "training", "dispatch", "scaling", "halting", "generation")


@dataclass(frozen=True)
class Mode:
    name: str
    model: dict[str, Any]  # overrides of the default preset's model (not applied to a --run model)
    serve_batches: tuple[int, ...]
    serve_seqs: tuple[int | None, ...]  # None: the model's max_seq_len
    train_batch: int | None  # None: the preset's train.batch_size
    dispatch_tokens: tuple[int, int]  # (batch, seq) through the MoE layer
    dispatch_settings: tuple[tuple[int, int], ...]  # (n_experts, top_k) of the MoE layer, dense vs sparse
    scaling_base: tuple[int, int]  # (batch, seq)
    scaling_points: dict[str, list[int]]
    matmul_n: int
    warmup: int
    repeats: int
    gen_batches: tuple[int, ...]
    gen_prompts: tuple[int, ...]  # prompt lengths in tokens
    gen_new: int  # new tokens per sample (greedy)
    # New tokens of the uncached paths by batch (absent: gen_new). Uncached generation recomputes the whole context
    # for every token: at batch 32 x 112 that is a full scoring pass per token, minutes for 64 tokens.
    gen_uncached_new: dict[int, int]
    gen_repeats: int  # timed generate calls per path and cell (each is long; the warm-up is one two-token call)
    compile_backend: str = "inductor"
    suffix: str = field(default="")  # of the output file names

    @property
    def files(self) -> tuple[str, str]:
        return f"results{self.suffix}.json", f"scaling{self.suffix}.png"


MODES = {
    "full": Mode(
        "full", model={}, serve_batches=(1, 8, 32), serve_seqs=(32, None), train_batch=None, dispatch_tokens=(16, 128),
        dispatch_settings=((4, 2), (8, 2), (8, 1)),
        scaling_base=(4, 128), scaling_points={"seq_len": [32, 64, 128, 256, 512], "batch": [1, 2, 4, 8, 16],
                                               "H_cycles": [1, 2, 3, 4], "L_cycles": [1, 2, 3, 4],
                                               "halt_max_steps": [1, 2, 3, 4], "n_experts": [2, 4, 8, 16]},
        matmul_n=4096, warmup=2, repeats=7,
        gen_batches=(1, 8, 32), gen_prompts=(16, 112), gen_new=64, gen_uncached_new={8: 16, 32: 8}, gen_repeats=3),
    "quick": Mode(
        "quick", model={"H_cycles": 1, "L_cycles": 1, "halt_max_steps": 1}, serve_batches=(1, 32), serve_seqs=(None,),
        train_batch=4, dispatch_tokens=(8, 128), dispatch_settings=((8, 2),),
        scaling_base=(2, 64), scaling_points={"seq_len": [32, 128, 512], "batch": [1, 4, 16],
                                              "H_cycles": [1, 2, 4], "L_cycles": [1, 2, 4],
                                              "halt_max_steps": [1, 2, 4], "n_experts": [2, 4, 8]},
        matmul_n=4096, warmup=1, repeats=5,
        gen_batches=(1, 32), gen_prompts=(112,), gen_new=16, gen_uncached_new={32: 4}, gen_repeats=2,
        suffix="-quick"),
    "smoke": Mode(
        "smoke", model={"vocab_size": 128, "max_seq_len": 16, "d_model": 32, "n_layers": 1, "d_expert": 32,
                        "H_cycles": 1, "L_cycles": 1, "halt_max_steps": 1},
        serve_batches=(2,), serve_seqs=(None,), train_batch=2, dispatch_tokens=(2, 16), dispatch_settings=((8, 2),),
        scaling_base=(1, 8), scaling_points={"seq_len": [8, 16], "batch": [1, 2], "H_cycles": [1, 2],
                                             "L_cycles": [1, 2], "halt_max_steps": [1, 2], "n_experts": [2, 4]},
        matmul_n=128, warmup=1, repeats=2,
        gen_batches=(2,), gen_prompts=(6,), gen_new=4, gen_uncached_new={}, gen_repeats=1,
        compile_backend="eager", suffix="-smoke"),
}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr, with the seconds since start; the table goes to stdout."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def subject(mode: Mode, run_dir: Path | None) -> tuple[RecursiveMoE, RunConfig, str]:
    """The model under test (eval mode), the run config for its training step, and where it came from."""
    rc = build_config("default", None, [])  # the preset's model and its training settings
    if run_dir is not None:
        model = load_model(run_dir)
        return model, replace(rc, model=model.config), f"trained run {run_dir}"
    rc = replace(rc, model=replace(rc.model, **mode.model))
    rc.model.validate()
    torch.manual_seed(0)
    what = "default preset" + (f" with {', '.join(f'{k}={v}' for k, v in mode.model.items())}" if mode.model else "")
    return RecursiveMoE(rc.model).eval(), rc, f"random init, {what}"


def serving_section(model: RecursiveMoE, mode: Mode, graphs: dict[str, Path], export_s: float | None,
                    onnx_path: Path | None, threads: int) -> dict[str, Any]:
    cfg = model.config
    T = cfg.max_seq_len
    shapes = list(dict.fromkeys((b, min(s or T, T)) for s in mode.serve_seqs for b in mode.serve_batches))
    target = max(shapes)  # where utilisation and the targets are stated: the largest batch, the longest sequence
    sessions = {name: OrtModel(p, provider="cpu", threads=threads) for name, p in graphs.items()}
    log(f"serving: {len(shapes)} shapes x eager / {' / '.join(sessions)}")
    rows = serving(model, sessions, shapes, mode.warmup, mode.repeats, mode.matmul_n, target)
    cell = next(row for row in rows if (row["batch"], row["seq"]) == target)
    peak = cell[PEAK]["flops_per_s"]
    ids = torch.from_numpy(random_batch(cfg.vocab_size, cell["batch"], cell["seq"])[0])  # the cell's own input
    flops = flops_summary(cfg, cell["seq"], measure_routing(model, ids))
    util = {}
    for name in ("eager", *sessions):
        tok_s = cell[name]["tokens_per_s"]
        mf, ef = tok_s * flops["model_flops_per_token"], tok_s * flops["executed_flops_per_token"]
        util[name] = {"tokens_per_s": tok_s, "model_flops_per_s": mf, "executed_flops_per_s": ef,
                      "model": mf / peak, "executed": ef / peak}
    return {"serving": {"onnx": str(onnx_path) if onnx_path else None, "export_s": export_s,
                        "opset": opset_of(graphs["ort_fp32"]), "session": sessions["ort_fp32"].describe(),
                        "rows": rows, "target_cell": cell},
            PEAK: {**cell[PEAK], "timed": f"interleaved with the serving calls at batch {cell['batch']} x "
                                          f"{cell['seq']}"},
            "flops": flops, "utilisation": util}


def run(mode: Mode, out_dir: Path, run_dir: Path | None = None, onnx_path: Path | None = None,
        threads: int | None = None, sections: tuple[str, ...] = SECTIONS, command: str = "") -> dict[str, Any]:
    """Run the suite; write DIR/results[-MODE].json (and the scaling plot); return the results."""
    t_start = time.perf_counter()
    threads = set_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file, plot_file = mode.files
    model, rc, source = subject(mode, run_dir)
    cfg = model.config
    r: dict[str, Any] = {
        "mode": mode.name, "command": command, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(threads), "source_tree": source_tree(),
        "settings": {**asdict(mode), "sections": list(sections)},
        "model": {"source": source, "params": sum(p.numel() for p in model.parameters()), "config": cfg.to_dict()},
    }
    r["cpu_use"] = {}
    log(f"{mode.name}: {source}")
    with tempfile.TemporaryDirectory() as tmp:
        sections_run(r, mode, model, rc, run_dir, onnx_path, threads, sections, Path(tmp), out_dir / plot_file)
    r["machine"]["load_average_end"] = list(os.getloadavg())
    r["wall_s"] = time.perf_counter() - t_start
    r["ratios"] = ratios(r)
    r["notes"] = notes(r)
    r["results_file"] = str(out_dir / results_file)
    atomic_write_text(out_dir / results_file, json.dumps(r, indent=1, allow_nan=False) + "\n")
    return r


def sections_run(r: dict[str, Any], mode: Mode, model: RecursiveMoE, rc: RunConfig, run_dir: Path | None,
                 onnx_path: Path | None, threads: int, sections: tuple[str, ...], tmp: Path, plot_path: Path) -> None:
    """Run each requested section into `r`, timing its CPU use. The exported graphs live in `tmp`."""
    cpu, cfg = r["cpu_use"], model.config
    graphs: dict[str, Path] = {}
    export_s: float | None = None
    generation = "generation" in sections
    if generation:
        task = saved_run_config(run_dir).train.task if run_dir is not None else "lm"
        if not can_decode(cfg, task):
            generation = False
            r["generation"] = {"skipped": f"no decode graph for this model (task {task}, causal {cfg.causal}, "
                                          f"attn_bias {cfg.attn_bias}): KV-cached generation needs a causal language "
                                          "model"}
    if "serving" in sections or "halting" in sections or generation:
        with cpu_use(cpu, "export"):
            graphs, export_s = export_graphs(model, run_dir, onnx_path, tmp, log, stepwise="halting" in sections,
                                             int8="serving" in sections, decode=generation)
    if "serving" in sections:
        with cpu_use(cpu, "serving"):
            r.update(serving_section(model, mode, graphs, export_s, onnx_path, threads))
    else:
        with cpu_use(cpu, "matmul_peak"):
            r[PEAK] = {**matmul_peak(mode.matmul_n, mode.warmup + 2, mode.repeats), "timed": "alone"}
    if "training" in sections:
        batch = mode.train_batch or rc.train.batch_size
        log(f"training step: eager vs torch.compile ({mode.compile_backend}), batch {batch}")
        with cpu_use(cpu, "training"):
            r["training"] = training(cfg, rc.train, batch, mode.warmup, mode.repeats, mode.compile_backend)
    if "dispatch" in sections:
        log("MoE dispatch")
        with cpu_use(cpu, "moe_dispatch"):
            r["moe_dispatch"] = moe_dispatch(cfg, *mode.dispatch_tokens, mode.warmup, mode.repeats,
                                             mode.dispatch_settings, mode.compile_backend, threads)
    if "scaling" in sections:
        log(f"scaling: {', '.join(mode.scaling_points)}")
        with cpu_use(cpu, "scaling"):
            r["scaling"] = scaling(cfg, *mode.scaling_base, mode.scaling_points, mode.warmup, mode.repeats)
        r["scaling"]["plot"] = str(plot(r["scaling"], plot_path,
                                        f"moe eager scoring time by factor ({mode.name} run, {r['started']})"))
    if "halting" in sections:
        with cpu_use(cpu, "halting"):
            r["halting"] = halting_section(model, run_dir, graphs["ort_fp32"], export_s, mode.serve_batches,
                                           mode.warmup, mode.repeats, threads, log)
    if generation:
        with cpu_use(cpu, "generation"):
            r["generation"] = generation_section(model, graphs["ort_fp32"], mode.gen_batches, mode.gen_prompts,
                                                 mode.gen_new, mode.gen_uncached_new, mode.gen_repeats, threads,
                                                 r["model"]["source"], log)
        r["generation"]["export_s"] = export_s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick", help="a few minutes")
    size.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="seconds; plumbing only")
    ap.add_argument("--run", type=Path, default=None, help="benchmark this trained run instead of a random-init model")
    ap.add_argument("--onnx", type=Path, default=None, help="the --run's exported model (default: export it now)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output folder (default: benchmarks/out)")
    ap.add_argument("--threads", type=int, default=None, help="threads for PyTorch and ORT (default: physical cores)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    args.mode = args.mode or "full"
    args.sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section {bad[0]!r} (choose from {', '.join(SECTIONS)})")
    if args.onnx is not None and args.run is None:
        ap.error("--onnx needs --run: the eager side must be the same weights")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    r = run(MODES[args.mode], args.out, args.run, args.onnx, args.threads, args.sections,
            command=" ".join(["python -m benchmarks", *argv]))
    print(table(r))
    print(f"\nwrote {r['results_file']}" + (f" and {r['scaling']['plot']}" if "scaling" in r else ""))
    return r

