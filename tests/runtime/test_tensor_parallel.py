"""Tensor parallelism from placements on 4 gloo ranks matches one plain process, with the right collectives.

Each case builds a model with a fixed seed on a (dp, tp) mesh, gives its parameters Megatron-style
placements on tp and pins the activations the layout names (``tpkit``), adds data parallelism on dp
(plait's WFBP or FSDP2) where dp > 1, and trains 3 AdamW steps on its share of each global batch. It is
compared with a plain single process on the same global batches: every step's loss and all parameters
after the last step. The collectives of the first step are counted by kind, mesh axes and phase.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tpkit import reference, train_rank

from plait.runtime import run_ranks

STEPS = 3
LOSS_RTOL = 1e-5  # measured: <= 1.2e-7 relative
# Parameters after 3 steps (measured: <= 2.4e-8 for the MLP, <= 1.3e-6 for the attention models). As in
# test_dp_equivalence, AdamW's eps = 1e-6 bounds how far rounding noise in near-zero gradients (the
# attention key bias) moves a parameter: lr * noise / eps per step.
PARAM_ATOL = 5e-6
AR, AG, RS = "all_reduce", "all_gather", "reduce_scatter"
TP, DP = ("tp",), ("dp",)

# name, mesh (dp, tp), global batch, data parallelism, collectives of the first step by phase:
# (forward, backward, after backward) as {(kind, axes): count}
CASES = [
    # Megatron MLP: an all-reduce after each of the 3 row-split layers in forward, and one for the input
    # gradient of column layers 3 and 5 in backward (layer 1's input needs no gradient); none for weights
    ("mlp", (1, 4), 32, "none", ({(AR, TP): 3}, {(AR, TP): 2}, {})),
    # post-LN layers: 2 per layer in forward (proj, fc2), 2 per layer in backward but for layer 0's QKV
    # input (the model's input needs no gradient): 4L-1 = 7
    ("transformer-tiny", (1, 4), 8, "none", ({(AR, TP): 4}, {(AR, TP): 3}, {})),
    # 2 heads on 4 ranks: attention splits the batch instead, with replicated weights whose gradients are
    # pending sums: gathered attention outputs (2) and logits (1); fc2 sums (2); in backward the fc1 and
    # vocabulary projection input gradients (3) and the attention input gradients gathered (2); then
    # reduce_grads_to_placements sums the 8 attention weight gradients
    (
        "gpt-tiny-batch",
        (1, 4),
        8,
        "none",
        ({(AG, TP): 3, (AR, TP): 2}, {(AR, TP): 3, (AG, TP): 2}, {(AR, TP): 8}),
    ),
    # the same under WFBP on dp: autograd sums the 8 pending-sum gradients into the bucket views during
    # backward; one all-reduce per bucket (3) on dp
    (
        "gpt-tiny-batch",
        (2, 2),
        8,
        "wfbp",
        ({(AG, TP): 3, (AR, TP): 2}, {(AR, TP): 11, (AG, TP): 2, (AR, DP): 3}, {}),
    ),
    # whole heads per rank, FSDP2 on dp: all-gathers of 2 blocks + root in forward, 2 blocks again in
    # backward, 3 reduce-scatters
    (
        "gpt-tiny-heads",
        (2, 2),
        8,
        "fsdp",
        ({(AG, DP): 3, (AR, TP): 4, (AG, TP): 1}, {(AG, DP): 2, (AR, TP): 5, (RS, DP): 3}, {}),
    ),
    # grouped-query attention (4 heads, 2 key/value heads) split by heads; o/down outputs summed in
    # forward (4), attention and MLP input gradients in backward (4: layer 0's input is the embedding's)
    ("hf-llama-tiny", (2, 2), 8, "wfbp", ({(AR, TP): 4}, {(AR, TP): 4, (AR, DP): 3}, {})),
]


@pytest.mark.parametrize(
    ("name", "shape", "size", "data_parallel", "expected"),
    CASES,
    ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[3]}" for c in CASES],
)
def test_matches_single_process(
    name: str, shape: tuple[int, int], size: int, data_parallel: str, expected: tuple[dict, dict, dict]
) -> None:
    ref_losses, ref_params = reference(name, size, STEPS)  # first, so the forked ranks inherit the imports
    results = run_ranks(train_rank, 4, name, shape, size, STEPS, data_parallel, timeout_s=240)
    first = results[0]
    for other in results[1:]:
        assert other["losses"] == first["losses"]
        assert (other["forward"], other["backward"], other["after"]) == (
            first["forward"],
            first["backward"],
            first["after"],
        )
    torch.testing.assert_close(
        torch.tensor(first["losses"]), torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0
    )
    assert first["params"].keys() == ref_params.keys()
    for n, p in first["params"].items():
        torch.testing.assert_close(
            p, ref_params[n], rtol=0, atol=PARAM_ATOL, msg=f"parameter {n} after {STEPS} steps"
        )
    assert (Counter(first["forward"]), Counter(first["backward"]), Counter(first["after"])) == tuple(
        map(Counter, expected)
    )
    assert first["steady"] == dict(sum(map(Counter, expected), Counter()))  # the last step issues the same
    if data_parallel == "wfbp":
        assert first["views"]  # every gradient (a DTensor's local tensor) is a view of its bucket
        assert first["num_launches"] == 3 * STEPS
        assert first["overlap"]  # the first bucket's all-reduce started before backward ended


# 20 steps of the MLP under bf16 autocast on (1, 4) against the fp32 single process. Measured: losses
# within 3.7e-6 relative and parameters within 2.9e-4, as close as a plain process under the same
# autocast comes (5.8e-6 and 3.1e-4; the two bf16 runs differ from each other by 5.2e-6 and 3.6e-4).
BF16_STEPS, BF16_LOSS_RTOL, BF16_PARAM_ATOL = 20, 5e-5, 2e-3


def test_bf16_autocast_stays_close_to_fp32() -> None:
    ref_losses, ref_params = reference("mlp", 32, BF16_STEPS)
    (first, *_) = run_ranks(train_rank, 4, "mlp", (1, 4), 32, BF16_STEPS, "none", True, timeout_s=240)
    torch.testing.assert_close(
        torch.tensor(first["losses"]), torch.tensor(ref_losses), rtol=BF16_LOSS_RTOL, atol=0
    )
    for n, p in first["params"].items():
        torch.testing.assert_close(p, ref_params[n], rtol=0, atol=BF16_PARAM_ATOL, msg=f"parameter {n}")
    assert first["bytes"] == {(AR, TP): 5 * 32 * 256 * 2}  # the activation sums travel in bf16
