"""What serve adds to the exported graph before ONNX Runtime sees it (in memory; the file is never changed):
the reductions serving needs, computed on the session's device, so only small tensors leave it — per-token
log-probs for scoring and the last valid position's logits for generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnx import ModelProto

TOKEN_LOGPROBS, LAST_LOGITS, NEXT_TOKEN = "token_logprobs", "last_logits", "next_token"


def add_serving_outputs(proto: ModelProto) -> None:
    """Append two outputs to the exported graph (standard ONNX ops, opset >= 13):

    token_logprobs [B, T-1]: log_softmax(logits)[b, t, input_ids[b, t+1]] — the log-prob of each next token;
    last_logits    [B, V]:   logits[b, sum(attention_mask[b]) - 1] — the last valid position (right padding).
    """
    from onnx import TensorProto, helper  # when a model is opened: `import serve` stays light

    g = proto.graph
    if {TOKEN_LOGPROBS, LAST_LOGITS} & {o.name for o in g.output}:
        return
    _add_constants(g, {"one": 1, "zero": 0, "minus_one": -1, "two": 2, "end": 2**62})
    n = helper.make_node
    g.node.extend([
        # token_logprobs: logits of positions 0..T-2 score the tokens at 1..T-1.
        n("LogSoftmax", ["logits"], ["serve/logp"], axis=-1),
        n("Slice", ["serve/logp", "serve/zero", "serve/minus_one", "serve/one"], ["serve/logp_prev"]),
        n("Slice", ["input_ids", "serve/one", "serve/end", "serve/one"], ["serve/next_ids"]),
        n("Unsqueeze", ["serve/next_ids", "serve/two"], ["serve/next_ids3"]),
        n("GatherElements", ["serve/logp_prev", "serve/next_ids3"], ["serve/token_logprobs3"], axis=2),
        n("Squeeze", ["serve/token_logprobs3", "serve/two"], [TOKEN_LOGPROBS]),
        # last_logits: position len-1 of every row.
        n("ReduceSum", ["attention_mask", "serve/one"], ["serve/len"], keepdims=1),
        n("Sub", ["serve/len", "serve/one"], ["serve/last"]),
        *_gather_last_logits("serve/last"),
    ])
    g.output.extend([helper.make_tensor_value_info(TOKEN_LOGPROBS, TensorProto.FLOAT, ["batch", "seq_minus_1"]),
                     helper.make_tensor_value_info(LAST_LOGITS, TensorProto.FLOAT, ["batch", "vocab"])])


def add_decode_outputs(proto: ModelProto, n_valid: int) -> None:
    """Append two outputs to a decode graph (moe_core/runtime/graph_contract.py), so that a decoding call returns [B, V]
    or [B] instead of [B, new, V]:

    last_logits [B, V]: the logits after each row's last new token, at index sum(attention_mask[b]) - 1 -
                        position_ids[b, 0] of the new tokens (the row's tokens after the call, less those before it);
    next_token  [B]:    the greedy choice among the tokenizer's first n_valid ids (ArgMax: the first of equal
                        maxima, as numpy's argmax), so that greedy decoding brings back only token ids.
    """
    from onnx import TensorProto, helper

    g = proto.graph
    if {LAST_LOGITS, NEXT_TOKEN} & {o.name for o in g.output}:
        return
    _add_constants(g, {"one": 1, "zero": 0, "two": 2, "end": 2**62, "n_valid": n_valid})
    n = helper.make_node
    g.node.extend([
        n("ReduceSum", ["attention_mask", "serve/one"], ["serve/total"], keepdims=1),  # [B, 1]
        n("Slice", ["position_ids", "serve/zero", "serve/one", "serve/one"], ["serve/before"]),
        n("Sub", ["serve/total", "serve/before"], ["serve/new"]),
        n("Sub", ["serve/new", "serve/one"], ["serve/last"]),  # [B, 1]
        *_gather_last_logits("serve/last"),
        n("Slice", [LAST_LOGITS, "serve/zero", "serve/n_valid", "serve/one"], ["serve/valid_logits"]),
        n("ArgMax", ["serve/valid_logits"], [NEXT_TOKEN], axis=1, keepdims=0),
    ])
    g.output.extend([helper.make_tensor_value_info(LAST_LOGITS, TensorProto.FLOAT, ["batch", "vocab"]),
                     helper.make_tensor_value_info(NEXT_TOKEN, TensorProto.INT64, ["batch"])])


def _add_constants(g, values: dict[str, int]) -> None:
    """int64 [1] initializers serve/NAME, for the nodes the functions above add."""
    from onnx import numpy_helper

    for name, value in values.items():
        g.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), f"serve/{name}"))


def _gather_last_logits(index: str) -> list:
    """Nodes from `index` [B, 1] (a position of each row) to LAST_LOGITS [B, V] = logits[b, index[b]]: Expand
    broadcasts the [B, 1, 1] index to [B, 1, V] for GatherElements."""
    from onnx import helper

    n = helper.make_node
    return [
        n("Unsqueeze", [index, "serve/two"], ["serve/last3"]),
        n("Shape", ["logits"], ["serve/logits_shape"]),
        n("Slice", ["serve/logits_shape", "serve/two", "serve/end"], ["serve/vocab"]),
        n("Concat", ["serve/one", "serve/one", "serve/vocab"], ["serve/index_shape"], axis=0),
        n("Expand", ["serve/last3", "serve/index_shape"], ["serve/last_index"]),
        n("GatherElements", ["logits", "serve/last_index"], ["serve/last_logits3"], axis=1),
        n("Squeeze", ["serve/last_logits3", "serve/one"], [LAST_LOGITS]),
    ]
