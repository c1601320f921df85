"""`make gpu-check` (python -m benchmarks.gpu_check): everything the CUDA path promises, on one GPU, in one command.

    PYTHONPATH=. python -m benchmarks.gpu_check [--out DIR] [--steps N] [--device cuda|cpu] [--smoke]

1. Train a few steps of the `gpu` preset's model (its widths; the recursion cut to H1 x L1 x 2 steps, so that the
   three exports' tracing fits the budget) with torch.compile and bf16 autocast, on a generated corpus.
2. `moe export --device cuda --stepwise` in fp32, fp16 and bf16: unrolled, step and decode graphs.
3. Placement read from live CUDA sessions (moe_core/runtime/ort_session.py): every compute node on CUDA, 0 Memcpy nodes,
and
   a CUDA-graph session accepted, for each of the nine graphs.
4. Parity on CUDA: ONNX Runtime CUDA against eager PyTorch on CUDA (TF32 off on both), the export's own checks
   (export/parity.py, export/decode.py): fp32 within the export's tolerance with halting identical; fp16 / bf16
   figures, with non-finite logits a failure.
5. Speed: scoring 32 x 512 (ORT CUDA per precision, outputs left on the device, against eager fp32 and eager bf16
   autocast), and cached greedy generation at batch 1 and 32 (ORT CUDA through serve's Server, against eager
   cached_forward on CUDA), tokens/s and whether the greedy tokens agree.
It writes DIR/gpu-check.json and prints a table; exit 1 on any failure, naming each, exit 2 when a package or the GPU
is missing (one line). `--device cpu --smoke` runs the same plumbing on the CPU with a micro model (the tests do).
onnxruntime-gpu may be an unpacked wheel instead of an installed one: MOE_ORT_GPU=DIR puts DIR first on sys.path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if os.environ.get("MOE_ORT_GPU"):  # before anything imports onnxruntime
    sys.path.insert(0, os.environ["MOE_ORT_GPU"])

PACKAGES = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "tokenizers", "safetensors", "click", "tqdm")
PRECISIONS = ("fp32", "fp16", "bf16")
KINDS = ("unrolled", "step", "decode")
RECURSION = {"H_cycles": 1, "L_cycles": 1, "halt_max_steps": 2}  # the cut that keeps three exports inside budget
SMOKE_MODEL = {"vocab_size": 300, "max_seq_len": 32, "d_model": 32, "n_layers": 1, "n_heads": 4, "min_heads": 1,
               "max_heads": 4, "n_experts": 4, "top_k": 2, "d_expert": 32}


class Missing(Exception):
    pass


def preflight(device: str) -> None:
    """One line naming what is missing: packages, the GPU, or the CUDA provider of onnxruntime."""
    absent = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if absent:
        raise Missing(f"missing packages: {', '.join(absent)} (no pip here: install them with the image, or put "
                      "an unpacked onnxruntime-gpu wheel in MOE_ORT_GPU)")
    if device == "cpu":
        return
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        raise Missing(f"torch {torch.__version__} sees no CUDA device")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Missing(f"onnxruntime {ort.__version__} at {Path(ort.__file__).parent} has no CUDAExecutionProvider: "
                      "it is the CPU wheel; onnxruntime-gpu (CUDA 13, cuDNN 9) is needed, installed or as "
                      "MOE_ORT_GPU=an unpacked wheel")
    ort.preload_dlls()


def corpus(path: Path, chars: int = 2_000_000) -> Path:
    """A generated text to train on (nothing is downloaded; the figures are about the runtimes, not the text): words
    of random syllables, varied enough for a byte-level BPE to reach the gpu preset's vocabulary."""
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "str", "ng"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20_000)]
    lines, n = [], 0
    while n < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16))).capitalize() + "."
        lines.append(line)
        n += len(line) + 1
    path.write_text("\n".join(lines) + "\n")
    return path


def train_run(out: Path, device: str, steps: int, smoke: bool) -> tuple[Path, dict[str, Any]]:
    from train.config import build_config
    from train.trainer import train

    repo = Path(__file__).resolve().parent.parent
    model = {**(SMOKE_MODEL if smoke else {}), **RECURSION}
    sets = [f"model.{k}={v}" for k, v in model.items()]
    sets += [f"train.{k}={v}" for k, v in {"max_steps": steps, "eval_every": steps, "checkpoint_every": steps,
                                           "log_every": max(1, steps // 4), "plots": "false", "eval_batches": 2,
                                           "device": device, "compile": "false" if smoke else "true"}.items()]
    if smoke:
        sets += ["train.batch_size=4"]
    sets.append(f"train.data={json.dumps(str(corpus(out / 'corpus.txt', 200_000 if smoke else 2_000_000)))}")
    cfg = build_config(None, str(repo / "configs" / "gpu.toml"), sets)  # by path: PYTHONPATH=. has no train.configs
    t0 = time.perf_counter()
    final = train(cfg, out / "run", overwrite=True)
    return out / "run", {"steps": steps, "seconds": time.perf_counter() - t0, "final": final,
                         "model": cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else model}


def export_all(run: Path, out: Path, smoke_precisions: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per precision: its graphs' paths by kind (KINDS), and the seconds the export took ("export_s", which
    run_check takes out)."""
    from export.onnx_export import export_run
    from moe_core.runtime.graph_contract import decode_path_for, step_path_for

    graphs: dict[str, dict[str, Any]] = {}
    for precision in smoke_precisions:
        path = out / f"model-{precision}.onnx"
        t0 = time.perf_counter()
        # Parity is checked below on the device itself (the export's CPU check of a large model takes minutes).
        export_run(run, path, check=False, overwrite=True, precision=precision, stepwise=True, decode=True,
                   device="cuda", log=lambda _: None)
        graphs[precision] = {"unrolled": path, "step": step_path_for(path), "decode": decode_path_for(path),
                             "export_s": time.perf_counter() - t0}
    return graphs


def providers_for(device: str) -> list[Any]:
    from moe_core.runtime.ort_session import CPU_EP, CUDA_EP

    return [(CUDA_EP, {"use_tf32": "0"}), CPU_EP] if device == "cuda" else [CPU_EP]


def placement(path: Path, device: str) -> dict[str, Any]:
    """The live session's placement (benchmarks/cuda_placement.py's row, with `ok`)."""
    from .cuda_placement import failures, placement_row

    row = placement_row(path, providers_for(device), threads=None)
    problems = failures(row)
    return {**row, "ok": not problems, "problems": problems}


def parity(model, graphs: dict[str, Path], precision: str, device: str) -> dict[str, Any]:
    from export.decode import check_decode_parity
    from export.parity import TOLERANCE, check_parity
    from moe_core.runtime.decoding import DeviceBuffers
    from moe_core.runtime.ort_session import ort_session

    providers = providers_for(device)
    tolerance = TOLERANCE if precision == "fp32" else None
    reports = {"unrolled": check_parity(model, str(graphs["unrolled"]), label=precision, tolerance=tolerance,
                                        providers=providers),
               "step": check_parity(model, str(graphs["step"]), label=precision, tolerance=tolerance,
                                    stepwise=True, providers=providers)}
    session = ort_session(graphs["decode"], None, providers)
    reports["decode"] = check_decode_parity(model, session, label=precision, tolerance=tolerance,
                                            buffers=DeviceBuffers(device, session.get_providers()))
    out = {}
    for kind, r in reports.items():
        finite = all(c.max_abs == c.max_abs and c.max_abs != float("inf") for c in r.cases)
        ok = r.ok if tolerance is not None else finite
        out[kind] = {"ok": ok, "max_abs": r.max_abs, "max_rel": r.max_rel,
                     "halt_identical": all(c.halt_equal for c in r.cases),
                     "top1": min(c.top1 for c in r.cases), "summary": r.summary()}
    return out


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def scoring(model, graphs: dict[str, dict[str, Path]], device: str, batch: int, seq: int,
            repeats: int) -> dict[str, Any]:
    """Forward of a [batch, seq] batch: ORT per precision (logits left on the device) and eager fp32 / bf16."""
    import numpy as np
    import torch

    from moe_core.runtime.ort_session import ort_session, run_bound_values

    from .timing import measure

    cfg = model.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    fns: dict[str, Callable[[], None]] = {}
    for precision, g in graphs.items():
        session = ort_session(g["unrolled"], None, providers_for(device))

        def run(session=session) -> None:
            run_bound_values(session, {"input_ids": ids, "attention_mask": mask}, ["logits", "halt_step"], device)
            synchronize(device)

        fns[f"ort_{precision}"] = run
    t_ids, t_mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    def eager(autocast: bool) -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            model(t_ids, t_mask)
        synchronize(device)

    fns["eager_fp32"] = lambda: eager(False)
    if device == "cuda":
        fns["eager_bf16_autocast"] = lambda: eager(True)
    timings = measure(fns, warmup=2, repeats=repeats)
    return {"batch": batch, "seq": seq, **{n: {"median_s": t.median, "tokens_per_s": batch * seq / t.median}
                                           for n, t in timings.items()}}


def eager_generate(model, prompts: list[list[int]], new: int, device: str) -> list[list[int]]:
    """Greedy cached generation with the eager model (cached_forward, its cache growing by concatenation): prompts of
    equal length, `new` tokens each, no stop token (the speed of `new` decoding calls)."""
    import torch

    B, P = len(prompts), len(prompts[0])
    with torch.inference_mode():
        ids = torch.tensor(prompts, device=device)
        pos = torch.arange(P, device=device).expand(B, P)
        out = model.cached_forward(ids, torch.ones_like(ids), pos, None)
        tokens, past, halt = [out.logits[:, -1].argmax(-1)], out.present, out.halt_step
        for i in range(new - 1):
            mask = torch.ones(B, P + i + 1, dtype=torch.long, device=device)
            at = torch.full((B, 1), P + i, device=device)
            out = model.cached_forward(tokens[-1][:, None], mask, at, past, halt)
            past = out.present
            tokens.append(out.logits[:, -1].argmax(-1))
        return torch.stack(tokens, 1).tolist()


def generation(model, graphs: dict[str, dict[str, Path]], device: str, batches: tuple[int, ...], prompt: int,
               new: int) -> dict[str, Any]:
    from .generation import IdServer, random_prompts

    cfg = model.config
    prompt = min(prompt, cfg.max_seq_len - new)
    out: dict[str, Any] = {"prompt": prompt, "new": new}
    for batch in batches:
        texts = random_prompts(cfg.vocab_size, batch, prompt, seed=batch)
        ids = [[int(t) for t in s.split()] for s in texts]
        eager_generate(model, ids, 2, device)  # warm-up
        t0 = time.perf_counter()
        eager = eager_generate(model, ids, new, device)
        synchronize(device)
        cell: dict[str, dict[str, Any]] = {"eager": {"tokens_per_s": batch * new / (time.perf_counter() - t0)}}
        for precision, g in graphs.items():
            server = IdServer.open(g["unrolled"], provider=device, runtime="unrolled", cache=True)
            assert server.decoder is not None  # exported with its decode graph (export_all)
            # On CUDA, decoding calls replay one CUDA graph per batch bucket; the same session without them (shapes
            # as they come, gpu_graph_id -1) shows what capture buys and that it changes no token.
            for name, static in ((f"ort_{precision}", server.decoder.static), (f"ort_{precision}_uncaptured", False)):
                if name.endswith("_uncaptured") and not server.decoder.static:
                    continue
                server.decoder.static = static
                server.generate(texts, max_new_tokens=2, batch_size=batch)  # warm-up: capture, allocations
                t0 = time.perf_counter()
                results = server.generate(texts, max_new_tokens=new, batch_size=batch)
                seconds = time.perf_counter() - t0
                made = sum(len(r.tokens) + (r.finish_reason == "eot") for r in results)
                same = sum(r.tokens == e[: len(r.tokens)] for r, e in zip(results, eager, strict=True))
                cell[name] = {"tokens_per_s": made / seconds, "samples_equal_to_eager": same, "samples": batch,
                              "cuda_graphs": static, "tokens": [r.tokens for r in results]}
        out[f"batch{batch}"] = cell
    return out


def run_check(out: Path, device: str, steps: int, smoke: bool, precisions: tuple[str, ...]) -> dict[str, Any]:
    import torch

    from moe_core import load_model

    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # parity is stated for fp32, as ORT runs it (use_tf32=0)
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    result: dict[str, Any] = {"device": device, "smoke": smoke, "failures": []}
    run, result["train"] = train_run(out, device, steps, smoke)
    graphs = export_all(run, out, precisions)
    model = load_model(run).to(device)
    model.use_dispatch("dense")  # what the CUDA graphs compute
    result["export_s"] = {p: g.pop("export_s") for p, g in graphs.items()}
    result["placement"] = {f"{p}/{k}": placement(g[k], device) for p, g in graphs.items() for k in KINDS}
    result["parity"] = {p: parity(model, g, p, device) for p, g in graphs.items()}
    seq = 512 if not smoke else model.config.max_seq_len
    result["scoring"] = scoring(model, graphs, device, 32, min(seq, model.config.max_seq_len), 3 if smoke else 10)
    result["generation"] = generation(model, graphs, device, (1, 32), 16 if smoke else 64, 8 if smoke else 64)
    for name, row in result["placement"].items():
        if not row["ok"]:
            result["failures"].append(f"placement {name}: {'; '.join(row['problems'])}")
    for key, cell in result["generation"].items():
        for name, row in list(cell.items()) if key.startswith("batch") else []:
            plain = cell.get(f"{name}_uncaptured")
            if plain is not None:  # reported, not failed: once a sample ends (EOT), the uncaptured batch shrinks,
                # its matmuls change shape, and a near-tie may round the other way
                row["tokens_equal_uncaptured"] = row["tokens"] == plain["tokens"]
    for key, cell in result["generation"].items():
        for row in cell.values() if key.startswith("batch") else []:
            row.pop("tokens", None)
    for p, kinds in result["parity"].items():
        for kind, row in kinds.items():
            if not row["ok"]:
                result["failures"].append(f"parity {p}/{kind}: {row['summary'].splitlines()[-1].strip()}")
    result["seconds"] = time.perf_counter() - t0
    return result


def table(r: dict[str, Any]) -> str:
    lines = [f"gpu-check on {r['device']}: {'PASS' if not r['failures'] else 'FAIL'} in {r['seconds']:.0f} s "
             f"(training {r['train']['seconds']:.0f} s, exports {sum(r['export_s'].values()):.0f} s)", "",
             "| graph | nodes | Memcpy | CUDA graph | parity max rel | halting | top-1 |",
             "|---|---|---:|---|---:|---|---:|"]
    for name, pl in r["placement"].items():
        p, kind = name.split("/")
        par = r["parity"][p][kind]
        nodes = ", ".join(f"{ep.removesuffix('ExecutionProvider')} {n}" for ep, n in pl.get("nodes", {}).items())
        lines.append(f"| {name} | {nodes} | {pl.get('memcpy', '-')} | {pl.get('cuda_graph', '-')} | "
                     f"{par['max_rel']:.2e} | {'identical' if par['halt_identical'] else 'DIFFER'} | "
                     f"{par['top1']:.4f} |")
    s = r["scoring"]
    lines += ["", f"scoring {s['batch']} x {s['seq']}: " + ", ".join(
        f"{n} {v['tokens_per_s']:,.0f} tok/s" for n, v in s.items() if isinstance(v, dict))]
    g = r["generation"]
    for key, cell in g.items():
        if key.startswith("batch"):
            lines.append(f"generation {key}, prompt {g['prompt']}, {g['new']} new: " + ", ".join(
                f"{n} {v['tokens_per_s']:,.1f} tok/s" + (f" ({v['samples_equal_to_eager']}/{v['samples']} = eager)"
                                                          if "samples" in v else "") for n, v in cell.items()))
    lines += [f"FAIL: {f}" for f in r["failures"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu-check", help="where the run, the graphs and gpu-check.json go")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a micro model (plumbing only; its figures mean nothing)")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated, of fp32,fp16,bf16 [default: all three on cuda; fp32,fp16 on cpu, whose "
                         "ONNX Runtime has no bf16 kernels]")
    a = ap.parse_args(argv)
    precisions = tuple(a.precisions.split(",")) if a.precisions else PRECISIONS if a.device == "cuda" \
        else ("fp32", "fp16")
    if not set(precisions) <= set(PRECISIONS):
        print(f"error: --precisions: expected names among {','.join(PRECISIONS)}, got {a.precisions!r}",
              file=sys.stderr)
        return 2
    try:
        preflight(a.device)
    except Missing as e:
        print(f"error: gpu-check: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    result = run_check(out, a.device, a.steps, a.smoke, precisions)
    from moe_core.common.files import atomic_write_text

    atomic_write_text(out / "gpu-check.json", json.dumps(result, indent=2, default=str) + "\n", overwrite=True)
    print(table(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
