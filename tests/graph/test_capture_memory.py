"""Capture allocates nothing real: a 70B-parameter GPT captures here, and real weights are neither
modified nor copied. Memory is measured in a fresh subprocess (peak RSS from /proc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from plait.graph import capture
from plait.models import GPT_CONFIGS, GPTConfig
from plait.models.gpt import GPT, lm_batch, lm_loss

MIB = 2**20

_PEAK = textwrap.dedent(
    """
    import json, os, time, torch
    torch.set_num_threads(1)

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    """
)

_CAPTURE_70B = _PEAK + textwrap.dedent(
    """
    from plait.graph import capture
    from plait.models import zoo_model
    z = zoo_model("gpt3-70b")
    with torch.device("meta"):
        model = z.build()
    before = rss("VmRSS:"); reset_peak(); t = time.perf_counter()
    g = capture(model, z.make_batch(1, device="meta"), loss_fn=z.loss, name="gpt3-70b")
    print(json.dumps({"seconds": time.perf_counter() - t, "before": before, "peak": rss("VmHWM:"),
                      "num_params": g.num_params, "fwd_flops": g.fwd_flops, "num_ops": len(g.ops),
                      "num_layers": len(g.layers), "activation_bytes": g.activation_bytes}))
    """
)

_CAPTURE_REAL = _PEAK + textwrap.dedent(
    """
    from plait.graph import capture
    from plait.models import MLP, MLPConfig
    model = MLP(MLPConfig(in_dim=1024, hidden=4096, num_layers=4, out_dim=1024))  # 224 MiB of real fp32
    x = torch.randn(8, 1024)
    capture(MLP(MLPConfig()), torch.randn(2, 64))  # warm up: imports and export's caches
    before = rss("VmRSS:"); reset_peak()
    g = capture(model, x)
    print(json.dumps({"before": before, "peak": rss("VmHWM:"), "param_bytes": g.param_bytes}))
    """
)


def _run(code: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gpt3_70b_captures_without_allocating() -> None:
    cfg = GPT_CONFIGS["gpt3-70b"]
    r = _run(_CAPTURE_70B)
    assert r["num_params"] == cfg.num_params  # 65.3e9; its weights alone would need 243 GiB in fp32
    assert r["num_layers"] == cfg.num_layers + 2
    tokens = cfg.seq_len
    dense = cfg.num_layers * 12 * cfg.hidden**2 + cfg.vocab_size * cfg.hidden
    attn = cfg.num_layers * 4 * cfg.seq_len**2 * cfg.hidden
    assert r["fwd_flops"] == 2 * dense * tokens + attn
    assert r["num_ops"] > 15 * cfg.num_layers  # about 18 export ops per block
    assert r["peak"] - r["before"] < 512 * MIB, r
    assert r["seconds"] < 60, r


def test_real_weights_are_not_copied() -> None:
    r = _run(_CAPTURE_REAL)
    assert r["param_bytes"] > 200 * MIB
    assert r["peak"] - r["before"] < 64 * MIB, r


def test_real_model_is_left_unchanged() -> None:
    cfg = GPTConfig(vocab_size=64, seq_len=16, num_layers=2, num_heads=2, hidden=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.blocks[1].requires_grad_(False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    g = capture(model, lm_batch(cfg, 2), loss_fn=lm_loss)
    assert g.num_params == cfg.num_params
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert [p.requires_grad for p in model.blocks[1].parameters()] == [False] * 12
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    tokens, targets = lm_batch(cfg, 2)
    lm_loss(model, (tokens, targets)).backward()  # still trains
