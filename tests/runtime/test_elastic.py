"""Elastic resize: a run moved 4 -> 2 -> 3 ranks (and an intra-op plan 4 -> 2) trains on the same samples, with the
same losses and final parameters, as a run that kept its size; every epoch's samples are seen exactly once."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from runkit import PLAIT, SCRIPTS, run_script_main, wait_for

from plait.data.samples import epoch_order
from plait.elastic import ElasticRun, elastic_run
from plait.plan import load_plan, save_plan
from plait.planners.request import PlanRequest
from plait.runtime import FINAL_FILE, read_metrics, run_ranks
from plait.runtime.elastic_launch import ELASTIC_DIR, RANKS_DIR

SCRIPT = SCRIPTS / "train_elastic.py"
SAMPLES, SEED = 48, 7  # train_elastic.py's dataset and stream seed
WAIT_S = 180.0


def script_args(steps: int, holds: list[int]) -> list[str]:
    return ["--steps", str(steps), *[a for h in holds for a in ("--hold", str(h))]]


def reference(plan: Path, out: Path, steps: int, *extra: str) -> None:
    """The same script on the same plan, never resized (forked ranks: the same code, quicker to start)."""
    env = {**os.environ, "PLAIT_PLAN": str(plan), "PLAIT_OUT": str(out), "PLAIT_RESUME": "0"}
    env.pop("PLAIT_ELASTIC_DIR", None)
    run_ranks(run_script_main, load_plan(plan).world_size, "train_elastic.py", [*extra, *script_args(steps, [])], env=env)


def hold_then(out: Path, step: int, ask: Callable[[], None], asked: Callable[[], bool]) -> None:
    """Wait until the ranks stand in ``step``, ask for a resize, wait until they all heard it, let them go on."""
    try:
        wait_for(lambda: (out / f"at-{step}").exists(), WAIT_S, f"the ranks to reach step {step}")
        ask()
        wait_for(asked, WAIT_S, f"the ranks to hear the resize request at step {step}")
    finally:
        (out / f"go-{step}").write_text("")  # never leave the ranks waiting


def asked_ranks(out: Path) -> int:
    return len(list((out / ELASTIC_DIR / RANKS_DIR).glob("*.asked")))


def seen_by_step(out: Path) -> dict[int, list[set[int]]]:
    """Per step, the sample indices each rank (of each launch) trained on."""
    steps: dict[int, list[set[int]]] = {}
    for path in sorted((out / "seen").glob("*.txt")):
        for line in path.read_text().splitlines():
            step, *indices = (int(x) for x in line.split())
            steps.setdefault(step, []).append(set(indices))
    return steps


def expected_batches(steps: int, batch: int) -> list[set[int]]:
    order = torch.cat([epoch_order(SAMPLES, e, seed=SEED) for e in range(steps * batch // SAMPLES + 1)])
    return [set(order[s * batch : (s + 1) * batch].tolist()) for s in range(steps)]


def assert_same_training(out: Path, ref: Path, steps: int, atol: float, param_atol: float) -> None:
    losses = read_metrics(out / "metrics.jsonl")
    ref_losses = read_metrics(ref / "metrics.jsonl")
    assert [m.step for m in losses] == list(range(1, steps + 1))  # no step lost or taken twice
    torch.testing.assert_close(torch.tensor([m.loss for m in losses]), torch.tensor([m.loss for m in ref_losses]),
                               rtol=0, atol=atol)
    final, expected = torch.load(out / FINAL_FILE), torch.load(ref / FINAL_FILE)
    assert final.keys() == expected.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=param_atol, msg=f"{name} after the resizes")


def test_resize_4_2_3_same_losses_and_every_sample_once(tmp_path: Path) -> None:
    steps, batch = 12, 12  # 144 samples: three epochs of 48
    plan = save_plan(PlanRequest(model="mlp-tiny", cluster="local:4", batch=batch, family="data-parallel").plan(),
                     tmp_path / "plan.json")
    out, ref, log = tmp_path / "run", tmp_path / "ref", tmp_path / "launcher.log"
    with log.open("w") as err:
        job = elastic_run(SCRIPT, plan=plan, out_dir=out, script_args=script_args(steps, [3, 7]), timeout_s=WAIT_S,
                          stdout=io.StringIO(), stderr=err)
        driver = threading.Thread(target=_drive, args=(job, out), daemon=True)
        driver.start()
        ended = job.run()
        driver.join(timeout=5)
    text = log.read_text()
    assert ended.ok, text[-3000:]
    assert [(r.step, r.old_nproc, r.new_nproc) for r in ended.resizes] == [(4, 4, 2), (8, 2, 3)], text[-3000:]
    assert "resize: 4 -> 2 ranks at step 4, re-planned in" in text and "resize: 2 -> 3 ranks at step 8" in text

    # every step's global batch is the stream's next 12 samples, trained once, whatever the number of ranks
    seen = seen_by_step(out)
    assert sorted(seen) == list(range(steps))
    for step, want in enumerate(expected_batches(steps, batch)):
        per_rank = seen[step]
        assert set().union(*per_rank) == want, f"step {step}"
        assert sum(len(s) for s in per_rank) == batch, f"step {step}: a sample trained twice"
    reference(plan, ref, steps)
    assert_same_training(out, ref, steps, atol=1e-5, param_atol=1e-5)


def _drive(job: ElasticRun, out: Path) -> None:
    hold_then(out, 3, lambda: job.resize(2), lambda: job.signalled_ranks() == 4 and asked_ranks(out) == 4)
    hold_then(out, 7, lambda: job.resize(3), lambda: job.signalled_ranks() == 2 and asked_ranks(out) == 2)


def test_intra_op_resize_4_to_2_by_control_file_and_signal(tmp_path: Path) -> None:
    """`plait run --elastic` driven by its control file and SIGHUP; a bad control file is refused, the job keeps its
    size; the intra-op plan (dp=2 x tp=2) is re-planned for 2 ranks and training matches an unresized run."""
    steps, batch = 8, 4
    # gpt-mini: on this CPU cluster the ILP splits its layers over 4 ranks; on 2 a model axis no longer pays off, so
    # the re-plan falls back to every family (a data-parallel plan)
    request = PlanRequest(model="gpt-mini", cluster="local:4", batch=batch, family="intra-op", mesh="2x2")
    plan = save_plan(request.plan(), tmp_path / "plan.json")
    out, ref = tmp_path / "run", tmp_path / "ref"
    control = out / "elastic.json"
    log = tmp_path / "plait-run.log"
    with log.open("w") as sink:
        job = subprocess.Popen([*PLAIT, "run", "--elastic", str(SCRIPT), "--plan", str(plan), "--out", str(out),
                                "--timeout", str(WAIT_S), "--", "--model", "gpt-mini", *script_args(steps, [2])],
                               stdout=subprocess.DEVNULL, stderr=sink, text=True)
    try:
        def ask() -> None:
            control.write_text("{\"nproc\": \"two\"}")
            os.kill(job.pid, signal.SIGHUP)
            wait_for(lambda: "holds '{\"nproc\": \"two\"}', not a number of ranks" in log.read_text(), WAIT_S,
                     "the launcher to refuse the bad control file")
            control.write_text("{\"nproc\": 2}\n")
            os.kill(job.pid, signal.SIGHUP)

        hold_then(out, 2, ask, lambda: asked_ranks(out) == 4)
        code = job.wait(WAIT_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    stderr = log.read_text()
    assert code == 0, stderr[-3000:]
    assert "resize: 4 -> 2 ranks at step 3, re-planned in" in stderr, stderr[-3000:]
    assert "elastic: asked for 2 ranks (running 4); re-planning" in stderr
    assert load_plan(plan).model_axes == ("tp",)
    assert "elastic: control file" in stderr and "keeping 4 ranks" in stderr
    assert "plait run: all 2 ranks finished" in stderr
    assert (out / ELASTIC_DIR / "plan-2.json").is_file()
    seen = seen_by_step(out)
    for step, want in enumerate(expected_batches(steps, batch)):
        assert set().union(*seen[step]) == want, f"step {step}"
    reference(plan, ref, steps, "--model", "gpt-mini")
    # the attention's key bias gets next to no gradient, so AdamW scales summation-order noise up to ~3e-5 there
    assert_same_training(out, ref, steps, atol=1e-5, param_atol=1e-4)


@pytest.mark.parametrize("text", ["two", "{\"nproc\": 0}", "{\"ranks\": 2}", "2.5", "{\"nproc\": true}", "[]"])
def test_bad_control_file_is_named(tmp_path: Path, text: str) -> None:
    from plait.errors import PlaitError
    from plait.runtime.elastic_launch import read_control

    path = tmp_path / "elastic.json"
    path.write_text(text)
    with pytest.raises(PlaitError, match=r"control file .*elastic\.json holds .*nproc"):
        read_control(path)


def test_good_control_file(tmp_path: Path) -> None:
    from plait.runtime.elastic_launch import read_control

    path = tmp_path / "elastic.json"
    assert read_control(path) is None
    for text, want in [("3", 3), ("{\"nproc\": 2}\n", 2), (" 4\n", 4)]:
        path.write_text(text)
        assert read_control(path) == want
