"""The Trainer's metrics file, atomic checkpoints and resume, also onto another world size and plan kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runkit import zoo_plan

from plait.errors import PlaitError
from plait.models import zoo_model
from plait.plan.ir import BatchSpec
from plait.runtime import (
    TrainConfig,
    Trainer,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    local_micro_batches,
    read_metrics,
    run_ranks,
    save_checkpoint,
)

OPT = {"lr": 1e-3, "eps": 1e-6, "progress": False}


def train(name: str, plan, steps: int, out: str | None, every: int = 0, resume: bool = False, keep: int = 2):
    """One rank of a Trainer run on the zoo model's step-seeded data; (start step, losses, final state)."""
    zm = zoo_model(name)

    def data(step: int):
        return zm.make_batch(plan.batch.global_size, generator=torch.Generator().manual_seed(7 + step))

    config = TrainConfig(steps=steps, out_dir=out, checkpoint_every=every, resume=resume, keep_checkpoints=keep, **OPT)
    result = Trainer(model_fn=zm.build, loss_fn=zm.loss, data=data, plan=plan, config=config).fit()
    return result.start_step, list(result.losses), result.final_state


def test_resume_on_another_world_size_and_kind(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    four = zoo_plan("gpt-tiny", "replicate", world=4, global_batch=8)
    two = zoo_plan("gpt-tiny", "fsdp", world=2, global_batch=8)
    start, first, _ = run_ranks(train, 4, "gpt-tiny", four, 3, out, 3)[0]
    assert start == 0 and len(first) == 3
    start, rest, final = run_ranks(train, 2, "gpt-tiny", two, 6, out, 3, True)[0]
    assert start == 3 and len(rest) == 3
    _, clean, clean_final = run_ranks(train, 2, "gpt-tiny", two, 6, None)[0]
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(clean), rtol=1e-5, atol=1e-6)
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, clean_final[name], rtol=1e-5, atol=2e-6)
    metrics = read_metrics(Path(out) / "metrics.jsonl")
    assert [m.step for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m.loss for m in metrics] == pytest.approx(first + rest, abs=1e-7)
    for m in metrics:
        assert m.step_s > 0 and m.samples_per_s == pytest.approx(8 / m.step_s)
    state = load_checkpoint(checkpoint_dir(out) / "step_00000006")
    assert state["world_size"] == 2 and state["mesh"] == {"dp": 2} and len(state["rng"]) == 2
    assert set(state["model"]) == set(final) and set(state["optimizer"]) == {"state", "param_groups"}


def test_checkpoints_keep_the_newest_and_resume_without_one_starts_afresh(tmp_path: Path) -> None:
    out = tmp_path / "run"
    plan = zoo_plan("mlp-tiny", "replicate", world=1, global_batch=4)
    start, losses, _ = run_ranks(train, 1, "mlp-tiny", plan, 4, str(out), 1, True)[0]  # resume, but nothing there
    assert start == 0 and len(losses) == 4
    root = checkpoint_dir(out)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert latest_checkpoint(root) == root / "step_00000004"
    start, again, _ = run_ranks(train, 1, "mlp-tiny", plan, 4, str(out), 1, True)[0]
    assert start == 4 and again == []  # nothing left to do


def test_checkpoint_writes_are_atomic(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, {"step": 2, "x": torch.ones(3)})
    crashed = root / ".tmp-step_00000004-99999"  # a writer killed half-way leaves only a temp dir
    crashed.mkdir()
    (crashed / "state.pt").write_bytes(b"partial")
    assert latest_checkpoint(root) == root / "step_00000002"
    assert load_checkpoint(root / "step_00000002")["x"].tolist() == [1.0, 1.0, 1.0]
    save_checkpoint(root, 4, {"step": 4})
    assert not crashed.exists() and latest_checkpoint(root) == root / "step_00000004"
    save_checkpoint(root, 1, {"step": 1})  # a fresh run in the same folder: later steps are stale
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    save_checkpoint(root, 4, {"step": 4})
    (root / "latest").write_text("step_00000009")
    with pytest.raises(PlaitError, match="names step_00000009, which is missing"):
        latest_checkpoint(root)
    (root / "step_00000004" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(PlaitError, match="cannot be read"):
        load_checkpoint(root / "step_00000004")


def test_micro_batches_are_each_ranks_contiguous_rows() -> None:
    spec = BatchSpec(global_size=12, micro_size=2, num_micro=2)
    rows = torch.arange(12)
    got = [[mb[0].tolist() for mb in local_micro_batches((rows,), spec, dp_rank=r)] for r in range(3)]
    assert got == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    with pytest.raises(PlaitError, match="leading dimension 10, but the plan's global batch is 12"):
        local_micro_batches((torch.arange(10),), spec, dp_rank=0)


def test_config_needs_an_output_folder_for_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PlaitError, match="checkpoint_every needs out_dir"):
        TrainConfig(steps=3, checkpoint_every=1)
    with pytest.raises(PlaitError, match="resume needs out_dir"):
        TrainConfig(steps=3, resume=True)
    monkeypatch.setenv("PLAIT_OUT", "/tmp/somewhere")
    monkeypatch.setenv("PLAIT_RESUME", "1")
    cfg = TrainConfig.from_env(steps=3, checkpoint_every=1)
    assert cfg.out_dir == "/tmp/somewhere" and cfg.resume
    assert json.loads(json.dumps(cfg.__dict__ | {"betas": list(cfg.betas)}))["steps"] == 3
