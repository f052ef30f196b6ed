"""Data parallelism under torchrun, on CPU with gloo and 2 processes: the update equals the single-process
update on the same rollouts, only rank 0 writes, resume continues exactly, bad setups fail fast."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT


def run(hook: str, args: list, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    return subprocess.run([*launcher, "tests/dist_hooks.py", hook, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def args_for(built, prompts, out, *extra):
    # one pair per verifier micro-batch and one response per update micro-batch: every number a rank
    # computes is then computed the same way by the single process (only sums are grouped differently)
    return ["--gen", built["qwen2"], "--verifier", built["gemma3"], "--prompts", prompts, "--out", out,
            "--group-size", 3, "--prompts-per-step", 2, "--micro-batch", 1, "--verifier-token-budget", 1,
            "--max-new-tokens", 8, "--lr", 1e-3, "--warmup-steps", 1, "--sample-every", 1, "--device", "cpu",
            "--epochs", 10, *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_on_the_same_rollouts(built, four_prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run("group-seeded", args_for(built, four_prompts, one, "--max-steps", 2))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run("group-seeded", args_for(built, four_prompts, two, "--max-steps", 2), ranks=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert [m["step"] for m in b] == [1, 2]  # rank 0 alone writes: no step twice
    for ma, mb in zip(a, b):
        for k in ("reward_mean", "reward_std", "cme_mean", "cme_std", "len_mean", "len_max", "truncated",
                  "zero_spread_groups", "shared_positions", "loss", "grad_norm", "clip_frac", "ratio_mean", "lr"):
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-7), k
    wa = AutoModelForCausalLM.from_pretrained(one / "checkpoint-2").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(two / "checkpoint-2").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert len((two / "samples.jsonl").read_text().splitlines()) == 2 * 2  # rank 0's samples only
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_a_resumed_two_rank_run_continues_exactly(built, four_prompts, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run("none", args_for(built, four_prompts, whole, "--max-steps", 3), ranks=2).returncode == 0
    assert run("none", args_for(built, four_prompts, parts, "--max-steps", 2), ranks=2).returncode == 0
    state = torch.load(parts / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG
    r = run("none", args_for(built, four_prompts, parts, "--max-steps", 3, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(whole), metrics(parts)
    assert [m["step"] for m in b] == [1, 2, 3]
    for k in ("reward_mean", "cme_mean", "len_mean", "loss", "grad_norm"):
        assert a[2][k] == pytest.approx(b[2][k], rel=1e-5, abs=1e-7), k
    r = run("none", args_for(built, four_prompts, parts, "--max-steps", 4, "--resume"))  # one process now
    assert r.returncode == 2 and "written by 2 ranks and this run has 1" in r.stderr


def test_a_world_size_that_does_not_divide_the_prompts(built, four_prompts, tmp_path):
    r = run("none", args_for(built, four_prompts, tmp_path / "x", "--prompts-per-step", 3), ranks=2, timeout=120)
    assert r.returncode != 0
    assert "--prompts-per-step 3 cannot be split over 2 ranks" in r.stderr


def test_a_failing_rank_ends_the_job(built, four_prompts, tmp_path):
    t = time.time()
    r = run("fail-rank-1", args_for(built, four_prompts, tmp_path / "x", "--max-steps", 3, "--dist-timeout", 30),
            ranks=2, timeout=300)
    assert r.returncode != 0 and "rank 1 failed on purpose" in r.stderr
    assert time.time() - t < 120  # the other rank did not wait forever in a collective


def test_sigterm_to_one_rank_stops_both_after_the_same_step(built, four_prompts, tmp_path):
    """A scheduler's SIGTERM reaching rank 1 alone: the ranks agree at the step's end, rank 0 saves that
    step's checkpoint, and a resume continues from it."""
    import os
    import signal

    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen([*launcher, "tests/dist_hooks.py", "none",
                             *map(str, args_for(built, four_prompts, out, "--epochs", 500))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics_file, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
        time.sleep(0.05)
    workers = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and (d / "stat").exists()
               and (d / "stat").read_text().rsplit(")", 1)[-1].split()[1] == str(proc.pid)]  # children of torchrun
    rank1 = [pid for pid in workers if "\x00RANK=1\x00" in "\x00" + Path(f"/proc/{pid}/environ").read_text(errors="replace")]
    assert len(rank1) == 1, workers
    os.kill(int(rank1[0]), signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    done = metrics_file.read_text().count("\n")
    assert (out / f"checkpoint-{done}").is_dir(), err[-2000:]  # rank 0 saved the step both stopped after
    assert "continue with --resume" in err
    r = run("none", args_for(built, four_prompts, out, "--epochs", 500, "--resume", "--max-steps", done + 1), ranks=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, done + 2))
