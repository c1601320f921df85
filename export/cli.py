"""`moe export`."""

from __future__ import annotations

import click

from moe_core.cli import run

from .choices import DEFAULT_OPSET, DEVICES, MAX_OPSET, MIN_OPSET, PRECISIONS


@click.command(context_settings={"show_default": True})
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="The ONNX file to write.")
@click.option("--opset", default=DEFAULT_OPSET, type=click.IntRange(MIN_OPSET, MAX_OPSET),
              help="ONNX opset version: 23 writes the fused Attention, RMSNormalization and RotaryEmbedding "
                   "operators; 18-22 decompose them, for older runtimes.")
@click.option("--check/--no-check", default=True,
              help="Run the parity check (ONNX Runtime vs eager PyTorch) and refuse to write on failure.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
              help="fp16 / bf16: half-precision weights and activations for GPU serving; int8: dynamic int8 "
                   "quantisation for CPU serving. The fp32 graph must pass parity first; the variant's own figures "
                   "are printed (bf16: not on a CPU, which has no bf16 kernels).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu",
              help="The device the graphs will run on. cuda: every compute node has a CUDA kernel and ONNX Runtime "
                   "copies nothing between host and device inside a forward (dense MoE dispatch, a decode graph "
                   "whose KV cache is in the graph's precision), so sessions can capture CUDA graphs; cpu: what is "
                   "fastest on CPUs (sparse dispatch where the config chose it, int8).")
@click.option("--eval-text", type=click.Path(), default=None,
              help="A text file: report eager vs exported mean loss on it (the accuracy cost of --precision). "
                   "Language models only.")
@click.option("--stepwise", is_flag=True,
              help="Also write OUT's stem + .step.onnx: one supervision step as its own graph (carry in, carry out), "
                   "which `moe serve` runs step by step, dropping each sample from the batch once it halts.")
@click.option("--decode/--no-decode", default=None,
              help="Also write OUT's stem + .decode.onnx, the KV-cached decode graph `moe serve --mode generate` "
                   "uses (causal language models). [default: on for a causal language model]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (and its tokenizer).")
def export(run_dir, out, opset, check, precision, device, eval_text, stepwise, decode, overwrite) -> None:
    """Export the model of RUN_DIR to one static ONNX graph.

    Inputs input_ids and attention_mask (int64 [batch, seq], both axes dynamic; pass ones when not padded),
    outputs logits (float32 [batch, seq, vocab]) and halt_step (int64 [batch]). All H/L cycles and halting steps
    are unrolled. The tokenizer is written beside the model as OUT's stem + .tokenizer.json.

    \b
    --stepwise adds OUT's stem + .step.onnx, one supervision step:
      inputs  input_ids, attention_mask [batch, seq]; z_H, z_L (the carry) [batch, seq, d_model]
      outputs next_z_H, next_z_L; logits [batch, seq, vocab]; halt_logit [batch] (halts when > 0)
    with the initial carry's vectors in its metadata. It passes the same parity check, run step by step.

    \b
    --decode (the default for a causal language model) adds OUT's stem + .decode.onnx, one graph for the prefill
    and every decoding call with a past/present key and value per block application of the recursion:
      inputs  input_ids, position_ids [batch, new]; attention_mask [batch, past + new]; past_halt_step [batch];
              past_key_values.{i}.key / .value [batch, heads, past, head_dim]
      outputs logits [batch, new, vocab]; halt_step [batch]; present.{i}.key / .value
    checked by a prefill and cached calls against the eager model.
    """
    from .onnx_export import decode_by_default, export_run

    if decode is None:
        decode = decode_by_default(run_dir)
    r = export_run(run_dir, out, opset=opset, check=check, overwrite=overwrite, precision=precision,
                   eval_text=eval_text, stepwise=stepwise, decode=decode, device=device, log=click.echo)
    click.echo(f"exported {r.path} | {device} | {r.precision} | opset {r.opset} | {r.nodes} nodes | "
               f"{r.params / 1e6:.2f}M parameters | "
               f"{r.size_bytes / 1e6:.1f} MB | tokenizer {r.tokenizer_path.name} | {r.seconds:.1f}s"
               + (f" | parity max rel {r.parity.max_rel:.1e}" if r.parity else " | parity not checked")
               + (f" | step graph {r.step_path.name}" if r.step_path else "")
               + (f" | decode graph {r.decode_path.name}" if r.decode_path else ""))


def main() -> None:
    run(export)
