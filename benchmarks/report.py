"""The targets as ratios, the closing notes, and the printed table — all from the results dict."""

from __future__ import annotations

from typing import Any

# (key, what it is, comparison, target). None: reported, no target. Where each is stated ("at") comes from the run:
# scoring at the grid's largest cell (32 x 128 in the full run) and its smallest (1 x 32); generation cached /
# uncached at the largest batch and longest prompt (32 x 112), ORT / eager cached at the smallest batch (1), the lower
# of its prompt lengths.
TARGETS: list[tuple[str, str, str | None, float | None]] = [
    ("serve_ort_fp32_vs_eager", "ORT fp32 / eager scoring throughput", ">=", 1.5),
    ("serve_ort_int8_vs_eager", "ORT int8 / eager scoring throughput", ">=", 2.0),
    ("serve_ort_fp32_vs_eager_small", "ORT fp32 / eager scoring, smallest cell", ">=", 3.0),
    ("gen_ort_cached_vs_uncached", "ORT cached / uncached generation tokens/s", ">=", 20.0),
    ("gen_ort_vs_eager_cached", "ORT / eager cached generation tokens/s", ">=", 2.0),
    ("gen_eager_cached_vs_uncached", "eager cached / uncached generation tokens/s", None, None),
    ("train_compiled_vs_eager", "torch.compile / eager training step", ">=", 1.3),
    ("moe_sparse_vs_dense", "sparse / dense MoE dispatch (8 experts top-2)", ">", 1.0),
    ("serve_utilisation", "ORT fp32 model FLOP/s / matmul peak", ">=", 0.40),
    ("serve_hw_utilisation", "ORT fp32 executed FLOP/s / matmul peak", None, None),
    ("serve_stepwise_vs_unrolled", "ORT step-wise / unrolled serving (largest batch)", None, None),
]
RATIO_KEYS = tuple(key for key, *_ in TARGETS)


def ratios(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every target's value (None with a `pending` reason when the section it needs was not run)."""
    values: dict[str, float | None] = dict.fromkeys(RATIO_KEYS)
    at: dict[str, str] = {}
    if "serving" in r:
        cell = r["serving"]["target_cell"]
        small = min(r["serving"]["rows"], key=lambda row: (row["batch"], row["seq"]))
        values["serve_ort_fp32_vs_eager"] = cell["ort_fp32"]["vs_eager"]
        values["serve_ort_int8_vs_eager"] = cell["ort_int8"]["vs_eager"]
        values["serve_ort_fp32_vs_eager_small"] = small["ort_fp32"]["vs_eager"]
        at["serve_ort_fp32_vs_eager"] = at["serve_ort_int8_vs_eager"] = f"{cell['batch']} x {cell['seq']}"
        at["serve_ort_fp32_vs_eager_small"] = f"{small['batch']} x {small['seq']}"
        values["serve_utilisation"] = r["utilisation"]["ort_fp32"]["model"]
        values["serve_hw_utilisation"] = r["utilisation"]["ort_fp32"]["executed"]
    if "halting" in r:
        values["serve_stepwise_vs_unrolled"] = r["halting"]["rows"][-1]["stepwise_vs_unrolled"]
    if "training" in r:
        values["train_compiled_vs_eager"] = r["training"]["compiled_vs_eager"]
    if "moe_dispatch" in r:
        values["moe_sparse_vs_dense"] = r["moe_dispatch"]["sparse_vs_dense"]
    if r.get("generation", {}).get("cells"):
        from .generation import targets_cells  # noqa: PLC0415 - the report itself needs no runtime

        big, small = targets_cells(r["generation"])
        low = min(small, key=lambda c: c["ratios"]["ort_cached_vs_eager_cached"])
        values["gen_ort_cached_vs_uncached"] = big["ratios"]["ort_cached_vs_ort_uncached"]
        values["gen_eager_cached_vs_uncached"] = big["ratios"]["eager_cached_vs_eager_uncached"]
        values["gen_ort_vs_eager_cached"] = low["ratios"]["ort_cached_vs_eager_cached"]
        at["gen_ort_cached_vs_uncached"] = at["gen_eager_cached_vs_uncached"] = \
            f"batch {big['batch']}, prompt {big['prompt']}"
        at["gen_ort_vs_eager_cached"] = f"batch {low['batch']}, prompt {low['prompt']}" + \
            (f" (the lower of prompts {', '.join(str(c['prompt']) for c in small)})" if len(small) > 1 else "")
    out = {}
    for key, what, op, target in TARGETS:
        v = values[key]
        met = None if v is None or target is None else (v >= target if op == ">=" else v > target)
        out[key] = {"what": what, "value": v, "at": at.get(key), "op": op, "target": target, "met": met,
                    "pending": None if v is not None else "section not run"}
    return out


def notes(r: dict[str, Any]) -> list[str]:
    """One line per missed target: by how much, and the measured facts that explain it."""
    out = []
    for key, t in r["ratios"].items():
        if t["met"] is not False:
            continue
        short = (1 - t["value"] / t["target"]) * 100
        line = f"{t['what']}: {fmt_value(key, t['value'])} vs target {t['op']} {fmt_value(key, t['target'])} " \
               f"(short by {short:.0f}%)"
        if key == "serve_ort_fp32_vs_eager":
            cell, u = r["serving"]["target_cell"], r["utilisation"]
            small = min(r["serving"]["rows"], key=lambda row: (row["batch"], -row["seq"]))
            lead = small["ort_fp32"]["vs_eager"]
            trend = "shrinks with the batch" if cell["ort_fp32"]["vs_eager"] < lead else "does not shrink here"
            line += (f"; ORT's lead is {lead:.2f}x at batch {small['batch']} x {small['seq']} (per-op overhead) and "
                     f"{trend}: at batch {cell['batch']} both run the same "
                     f"function ({r['flops']['moe_dispatch']} dispatch) in the same matmul kernels, eager at "
                     f"{u['eager']['executed']:.0%} and ORT at {u['ort_fp32']['executed']:.0%} of the peak on the "
                     f"executed FLOPs; ORT int8 reaches {cell['ort_int8']['vs_eager']:.2f}x")
        elif key == "train_compiled_vs_eager":
            tr = r["training"]
            line += (f"; steady step {tr['eager']['median_s']:.3f} s eager vs {tr['compiled']['median_s']:.3f} s "
                     f"compiled, first compiled step {tr['first_compiled_step_s']:.1f} s ({tr['backend']}); "
                     f"{tr['eager_matmul_share']:.0%} of an eager step is matmul and attention kernels, which "
                     f"compiling leaves as they are: even removing all the rest would give at most "
                     f"{1 / tr['eager_matmul_share']:.2f}x")
        elif key == "serve_utilisation":
            f = r["flops"]
            cfg = r["model"]["config"]
            dense = (f"all {cfg['n_experts']} experts vs top-{cfg['top_k']} (dense dispatch), "
                     if f["experts_run"] > cfg["top_k"] else "")
            line += (f"; executed FLOPs are {f['executed_per_model']:.2f}x the model FLOPs ({dense}all "
                     f"{cfg['n_heads']} heads vs {f['heads_per_token']:.2f} used, full vs causal attention): counting "
                     f"them, ORT runs at {r['utilisation']['ort_fp32']['executed']:.0%} of the peak")
        elif key == "moe_sparse_vs_dense":
            line += f"; sparse dispatch is not faster than dense on {r['moe_dispatch']['headline']}"
        elif key == "serve_ort_int8_vs_eager":
            cell = r["serving"]["target_cell"]
            line += (f" at {t['at']}; int8 runs {cell['ort_fp32']['median_s'] / cell['ort_int8']['median_s']:.2f}x "
                     f"ORT fp32 there (ORT fp32 {cell['ort_fp32']['vs_eager']:.2f}x eager)")
        elif key == "serve_ort_fp32_vs_eager_small":
            small = min(r["serving"]["rows"], key=lambda row: (row["batch"], row["seq"]))
            line += (f" at {t['at']}: {small['eager']['median_s'] * 1e3:.1f} ms eager vs "
                     f"{small['ort_fp32']['median_s'] * 1e3:.1f} ms ORT per call")
        elif key in ("gen_ort_cached_vs_uncached", "gen_ort_vs_eager_cached"):
            line += f" at {t['at']}; " + gen_note(r, key)
        out.append(line)
    for t in r["ratios"].values():
        if t["pending"] and t["target"] is not None:
            out.append(f"{t['what']}: not measured ({t['pending']})")
    return out


def gen_note(r: dict[str, Any], key: str) -> str:
    """The generation figures behind a missed generation target: ms per token after the first token, TTFT."""
    from .generation import targets_cells  # noqa: PLC0415 - the report itself needs no runtime

    big, small = targets_cells(r["generation"])
    c = big if key == "gen_ort_cached_vs_uncached" else min(
        small, key=lambda c: c["ratios"]["ort_cached_vs_eager_cached"])
    paths = ("ort_cached", "ort_uncached") if key == "gen_ort_cached_vs_uncached" else ("ort_cached", "eager_cached")
    per = ", ".join(f"{p} {c['batch'] / c[p]['after_first_tokens_per_s'] * 1e3:.1f} ms per step after the first token "
                    f"(TTFT {c[p]['ttft_s'] * 1e3:.0f} ms)" for p in paths)
    return f"{per}; the KV cache holds {c['kv_cache']['bytes'] / 2**20:.1f} MiB at its longest"


def fmt_value(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1%}" if "utilisation" in key else f"{v:.2f}x"


def code_line(tree: dict[str, Any] | None) -> str:
    if not tree or tree.get("commit") is None:
        return "code: not a git checkout"
    mod = tree["modified"]
    return f"code: commit {tree['commit']}" + (f" + uncommitted changes to {', '.join(mod)}" if mod else "")


def describe_model(cfg: dict[str, Any]) -> str:
    rec = (f"H{cfg['H_cycles']} x L{cfg['L_cycles']} x {cfg['halt_max_steps']} steps" if cfg["recursive"]
           else "no recursion")
    return (f"d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads ({cfg['min_heads']}-"
            f"{cfg['max_heads']} per token), {cfg['n_experts']} experts top-{cfg['top_k']} (d_expert "
            f"{cfg['d_expert']}, moe_dispatch {cfg['moe_dispatch']}), {rec}, vocab {cfg['vocab_size']}, "
            f"seq {cfg['max_seq_len']}")


def table(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    lines = [f"moe benchmarks ({r['mode']}): {r['started']}, {r['wall_s']:.0f} s wall",
             f"machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical), threads: torch "
             f"{m['torch_threads']} / ORT {m['ort_intra_op_threads']} (idle workers: ORT sleep, PyTorch "
             f"OMP_WAIT_POLICY {m.get('omp_wait_policy', 'not recorded')}) | load avg {m['load_average'][0]:.2f} at "
             f"start | "
             f"python {m['python']} | torch {m['torch']} | onnxruntime {m['onnxruntime']} | onnx {m['onnx']}",
             f"model: {r['model']['source']}, {r['model']['params'] / 1e6:.2f}M params: "
             f"{describe_model(r['model']['config'])}",
             code_line(r.get("source_tree")),
             f"timing: median of {s['repeats']} interleaved calls after {s['warmup']} warm-up calls (IQR in the JSON)",
             "CPU cores taken by other processes, mean per section (0 = the machine to ourselves): "
             + ", ".join(f"{k} {v['others_cores']:.2f}" for k, v in r["cpu_use"].items())
             + f" | load avg at end {m['load_average_end'][0]:.2f}",
             f"matmul peak (fp32 {r['matmul_peak']['n']}^3, timed {r['matmul_peak']['timed']}): "
             f"{r['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s"]
    if "serving" in r:
        sv = r["serving"]
        exp = f"exported in {sv['export_s']:.0f} s" if sv["export_s"] is not None else f"graph {sv['onnx']}"
        opset = f"opset {sv['opset']}; " if sv.get("opset") else ""
        lines += ["", f"serving: scoring tokens/s (forward + next-token log-probs), ratio vs eager; {exp}; "
                      f"{opset}ORT {sv['session']}",
                  f"{'batch':>5} {'seq':>4} {'eager':>9} {'ORT fp32':>17} {'ORT int8':>17}  "
                  f"{'max|dlogp| fp32/int8':>20}"]
        for row in sv["rows"]:
            lines.append(f"{row['batch']:>5} {row['seq']:>4} {row['eager']['tokens_per_s']:>9,.0f} "
                         + " ".join(f"{row[k]['tokens_per_s']:>9,.0f} ({row[k]['vs_eager']:.2f}x)"
                                    for k in ("ort_fp32", "ort_int8"))
                         + f"  {row['ort_fp32']['max_abs_logprob_diff']:>9.1e} / "
                           f"{row['ort_int8']['max_abs_logprob_diff']:.1e}")
        f = r["flops"]
        cell = sv["target_cell"]
        lines += ["", f"FLOPs per token at seq {f['seq_len']} (routing measured on the batch {cell['batch']} input: "
                      f"{f['heads_per_token']:.2f} heads/token; samples halt at step {f['halt_step_mean']:.2f} on "
                      f"average, every runtime here runs all {f['steps_run']} step(s)):",
                  f"  model    {f['model_flops_per_token'] / 1e6:8.2f} MFLOP (heads used, top-k experts, causal "
                  f"context, steps run)",
                  f"  executed {f['executed_flops_per_token'] / 1e6:8.2f} MFLOP (every head, {f['experts_run']} "
                  f"experts ({f['moe_dispatch']} dispatch), full attention, steps run: {f['executed_per_model']:.2f}x)",
                  f"utilisation at batch {cell['batch']} x {cell['seq']} (FLOP/s / matmul peak):"]
        for name, u in r["utilisation"].items():
            lines.append(f"  {name:<8} model {u['model_flops_per_s'] / 1e9:6.1f} GFLOP/s = {u['model']:5.1%}   "
                         f"executed {u['executed_flops_per_s'] / 1e9:6.1f} GFLOP/s = {u['executed']:5.1%}"
                         + ("  (int8 matmuls against the fp32 peak)" if name == "ort_int8" else ""))
    if "training" in r:
        tr = r["training"]
        lines += ["", f"training step (batch {tr['batch']} x {tr['seq']}, loss + backward + clip + AdamW):"]
        for name in ("eager", "compiled"):
            lines.append(f"  {name:<9} {tr[name]['median_s']:7.3f} s/step {tr[name]['tokens_per_s']:9,.0f} tokens/s"
                         + (f"  ({tr['compiled_vs_eager']:.2f}x; first step {tr['first_compiled_step_s']:.1f} s = "
                            f"compile {tr['compile_s']:.1f} s, backend {tr['backend']}, regional)"
                            if name == "compiled" else ""))
    if "moe_dispatch" in r:
        d = r["moe_dispatch"]
        lines += ["", f"MoE dispatch: the MoE layer alone, {d['batch']} x {d['seq']} tokens, ms per call dense / "
                      f"sparse (dense time / sparse time): inference forward eager and ONNX Runtime fp32 / int8, "
                      f"training forward + backward eager and torch.compile ({d['backend']}); max |sparse - dense| "
                      f"over the fp32 paths (int8 differs by its quantisation noise)",
                  f"  {'experts':<9} {'auto':<7}" + "".join(f"{p:>24}" for p in d["paths"]) + f"{'max|diff|':>11}"]
        for s in d["settings"]:
            cells = "".join(f"{s[p]['dense']['median_s'] * 1e3:>9.1f} /{s[p]['sparse']['median_s'] * 1e3:>6.1f} "
                            f"({s[p]['sparse']['vs_dense']:.2f}x)" for p in d["paths"])
            diff = max(s[p]["sparse"]["max_abs_diff"] for p in d["paths"] if p != "ort_int8")
            lines.append(f"  {s['n_experts']} top-{s['top_k']:<3} {s['auto']:<7}{cells}{diff:>11.1e}")
        first = ", ".join(f"{s['n_experts']} top-{s['top_k']} {s['train_compiled']['dense']['first_call_s']:.0f} / "
                          f"{s['train_compiled']['sparse']['first_call_s']:.0f} s" for s in d["settings"])
        lines.append(f"  compiled: first call (compile) dense / sparse {first}; graphs compiled after the first calls "
                     f"(routing changing per call): {sum(s['recompiles_after_first_call'] for s in d['settings'])}")
    if "scaling" in r:
        sc = r["scaling"]
        b = sc["base"]
        lines += ["", f"scaling: eager scoring time, one factor at a time from batch {b['batch']} x seq {b['seq']}, "
                      f"H{b['H_cycles']} L{b['L_cycles']} {b['halt_max_steps']} steps {b['n_experts']} experts "
                      f"(plot: {sc['plot']})",
                  f"  {'factor':<15} {'values':<22} {'ms':<34} {'time~x^p':>8} {'FLOPs~x^q':>9}  growth"]
        for factor, f in sc["factors"].items():
            ms = ",".join(f"{t * 1e3:.0f}" if t >= 0.01 else f"{t * 1e3:.1f}" for t in f["median_s"])
            lines.append(f"  {factor:<15} {','.join(map(str, f['x'])):<22} {ms:<34} {f['time_exponent']:>8.2f} "
                         f"{f['flops_exponent']:>9.2f}  {f['growth']}")
    if "halting" in r:
        from .halting import table_lines  # noqa: PLC0415 - the report itself needs no runtime

        lines += ["", *table_lines(r["halting"])]
    if "generation" in r:
        from .generation import table_lines as generation_lines  # noqa: PLC0415 - the report itself needs no runtime

        g = r["generation"]
        lines += ["", *(generation_lines(g) if g.get("cells") else [f"generation: not run ({g['skipped']})"])]
    lines += ["", "targets (ratios measured in this run):"]
    for key, t in r["ratios"].items():
        goal = f"{t['op']} {fmt_value(key, t['target'])}" if t["target"] is not None else "(reported)"
        verdict = {True: "met", False: "MISSED", None: "pending" if t["pending"] else ""}[t["met"]]
        where = f" ({t['at']})" if t.get("at") else ""
        lines.append(f"  {t['what'] + where:<80} {fmt_value(key, t['value']):>7}  {goal:<9} {verdict}")
    if r["notes"]:
        lines += ["", "notes:"] + [f"  - {n}" for n in r["notes"]]
    return "\n".join(lines)
