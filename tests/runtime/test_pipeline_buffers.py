"""The pipeline runtime's receive buffers hold storage only while their micro-batch is in flight: under 1F1B a
stage never has more input buffers with storage than its in-flight bound plus the one being received, and none
after the step (torch alone keeps one per micro-batch for the whole run)."""

from __future__ import annotations

from typing import Any

import torch
from planrun import OPT, data_of, model_parts

from plait.runtime import init_distributed, run_ranks, teardown
from plait.runtime.pipeline import build_pipeline_rank
from plait.runtime.pipeline_buffers import LazyRecvStage

LAYERS = ["embed", "blocks.0", "blocks.1", "head"]  # gpt-tiny's layer view
MICRO, BATCH = 8, 8


def live_bytes(stage: LazyRecvStage, records: dict[int, Any]) -> tuple[int, int]:
    """How many of ``records``' buffers have storage, and how many bytes they hold."""
    held = [info.buffer for infos in records.values() for info in infos
            if isinstance(info.buffer, torch.Tensor) and info.buffer.untyped_storage().nbytes() > 0]
    return len(held), sum(b.untyped_storage().nbytes() for b in held)


def count_rank(schedule: str) -> dict[str, Any]:
    init_distributed()
    build, _, loss = model_parts("gpt-tiny")
    torch.manual_seed(0)
    model = build()
    rank = build_pipeline_rank(model, [[n] for n in LAYERS], pp=4, dp=1, schedule=schedule, num_micro=MICRO, loss=loss)
    stage = rank.stages[0]
    assert isinstance(stage, LazyRecvStage)
    most = {"inputs": 0, "grads": 0}
    materialize = stage._materialize

    def counted(infos: Any) -> None:
        materialize(infos)
        most["inputs"] = max(most["inputs"], live_bytes(stage, stage.args_recv_info)[0])
        most["grads"] = max(most["grads"], live_bytes(stage, stage.grad_recv_info)[0])

    stage._materialize = counted  # type: ignore[method-assign]
    opt = torch.optim.AdamW(list(rank.params.values()), **OPT)
    data = data_of("gpt-tiny", BATCH)
    after = []
    for step in range(2):
        opt.zero_grad()
        rank.step(data(step))
        opt.step()
        after.append(live_bytes(stage, stage.args_recv_info)[1] + live_bytes(stage, stage.grad_recv_info)[1])
    out = {"stage": stage.stage_index, "most": most, "after": after}
    teardown()
    return out


def test_1f1b_keeps_receive_buffers_of_in_flight_micro_batches_only() -> None:
    for r in run_ranks(count_rank, 4, "1f1b", timeout_s=600):
        stage = r["stage"]
        assert r["after"] == [0, 0]
        if stage > 0:  # the first stage receives no input
            assert 1 <= r["most"]["inputs"] <= 4 - stage + 1 < MICRO
        if stage < 3:  # the last stage receives no gradient
            assert r["most"]["grads"] == 1


def test_gpipe_holds_every_input_buffer_until_the_backwards() -> None:
    """GPipe runs every forward before any backward: all its micro-batches are in flight at once."""
    for r in run_ranks(count_rank, 4, "gpipe", timeout_s=600):
        assert r["after"] == [0, 0]
        if r["stage"] > 0:
            assert r["most"]["inputs"] == MICRO
