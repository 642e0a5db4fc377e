"""`plait plan` offers token slicing beside micro-batch pipelining and says by how much it wins; `plait sim` shows the
slices' passes per rank; `--no-token-slicing` plans without them (issue 8)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from clikit import plait_in_process

from plait.plan import load_plan

FACTORY = """
import torch
from plait.models import GPT, GPTConfig, lm_batch, lm_loss

def long_gpt():
    cfg = GPTConfig(vocab_size=512, seq_len=1024, num_layers=4, num_heads=4, hidden=256)
    with torch.device("meta"):
        model = GPT(cfg)
    return model, lm_batch(cfg, 1, device="meta"), lm_loss
"""


def run(*args: str) -> tuple[int, str, str]:
    """``plait ARGS`` in this process: (exit code, stdout, stderr)."""
    result = plait_in_process(*args)
    return result.returncode, result.stdout, result.stderr


def test_plan_picks_token_slicing_and_sim_shows_the_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "plan.json"
    args = ["plan", "token_models:long_gpt", "--cluster", "local:4", "--family", "pipeline", "--batch", "1"]
    code, text, err = run(*args, "--out", str(out))
    assert code == 0, err
    plan = load_plan(out)
    cuts = plan.schedule.token_slices
    assert cuts and len(cuts) > 1 and sum(cuts) == 1024
    assert f"token slicing: {len(cuts)} slices" in err and "faster than micro-batch-only pipelining" in err
    assert "--no-token-slicing" in err  # the token pipeline runs on CPU ranks only: the way out for GPUs
    assert "faster than micro-batch-only" in text

    code, text, err = run("sim", str(out), "--passes", "3")
    assert code == 0, err
    assert "token slicing" in text and "F0.s0@" in text and "F0.s1@" in text and "more)" in text

    code, text, err = run(*args, "--no-token-slicing", "--json")
    assert code == 0, err
    assert json.loads(text)["schedule"]["token_slices"] is None
    sys.modules.pop("token_models", None)
