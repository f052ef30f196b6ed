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


@pytest.mark.parametrize("knobs", [[], ["--loss-type", "token", "--num-iterations", "2"]],
                         ids=["paper", "token-loss-mu2"])
def test_two_ranks_equal_one_process_on_the_same_rollouts(built, four_prompts, tmp_path, knobs):
    """The token loss's normaliser counts every rank's tokens, and mu = 2's old log-probs are each rank's own."""
    from transformers import AutoModelForCausalLM

    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run("group-seeded", args_for(built, four_prompts, one, "--max-steps", 2, *knobs))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run("group-seeded", args_for(built, four_prompts, two, "--max-steps", 2, *knobs), ranks=2)
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


def test_a_failing_rank_ends_the_job_in_seconds(built, four_prompts, tmp_path):
    """A rank that raises ends the job within a minute, while a rank hanging in a collective would wait
    --dist-timeout (10 minutes here) before failing: the bound can only be met if nobody hangs."""
    t = time.time()
    r = run("fail-rank-1", args_for(built, four_prompts, tmp_path / "x", "--max-steps", 3, "--dist-timeout", 600),
            ranks=2, timeout=900)
    assert r.returncode != 0 and "rank 1 failed on purpose" in r.stderr
    assert time.time() - t < 60


def checkpoints_on_disk(out: Path) -> list[int]:
    """The steps of the checkpoint-N folders in out; each must be whole: weights that load, its step."""
    from transformers import AutoModelForCausalLM

    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    for s in steps:
        AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{s}")
        assert torch.load(out / f"checkpoint-{s}" / "training_state.pt", weights_only=True)["step"] == s
    return steps


@pytest.mark.parametrize("target,sig,slow,timeout,keeps", [
    # one worker signalled; the write outlasts the 30 s the agent gives the others once one has failed
    ("rank1", "SIGTERM", 35, 3, "stop"),
    ("all", "SIGTERM", 1, 30, "stop"),     # a scheduler's cancel: every process, then the agent forwards it
    ("agent", "SIGINT", 1, 30, "stop"),    # Ctrl-C in torchrun's terminal: the agent forwards it
    ("agent", "SIGTERM", 1, 30, "stop"),   # a kill aimed at torchrun alone: the same, with SIGTERM
    ("agent", "SIGTERM", 6, 3, "intact")])  # the stop's write cannot fit the agent's --shutdown-timeout
def test_a_stop_under_torchrun_keeps_a_checkpoint_a_resume_continues_from(built, four_prompts, tmp_path, target,
                                                                          sig, slow, timeout, keeps):
    """Each way a torchrun job is really stopped. "stop": the newest complete step is saved (every
    rank waits for rank 0's write, so the agent never sees a worker leave while it is made, and a
    second signal does not abort it). "intact": a write slower than the agent's --shutdown-timeout is
    cut by its SIGKILL; every checkpoint on disk is still whole. Either way a 2-rank resume continues.
    Periodic checkpoints only where the stop's own cannot be written, so that "stop" is the stop's."""
    out = tmp_path / "run"
    every = 2 if keeps == "intact" else 1000
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--shutdown-timeout", str(timeout)]
    hook = f"stop-at:3:{target}:{sig}:{slow}:{tmp_path / 'slow'}"
    proc = subprocess.Popen([*launcher, "tests/dist_hooks.py", hook,
                             *map(str, args_for(built, four_prompts, out, "--epochs", 500, "--save-every", every))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job under a scheduler
    _, err = proc.communicate(timeout=300)
    done = len(metrics(out))
    steps = checkpoints_on_disk(out)
    if keeps == "stop":
        assert done >= 3 and steps[-1] == done, (steps, done, err[-2000:])  # the step the ranks stopped after
        assert "continue with --resume" in err
    else:
        assert steps and steps[-1] <= done, (steps, done)
    r = run("none", args_for(built, four_prompts, out, "--epochs", 500, "--save-every", every, "--resume",
                             "--max-steps", steps[-1] + 1), ranks=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, steps[-1] + 2))


def test_a_dying_rank_leaves_the_newest_complete_step_on_disk(built, four_prompts, tmp_path):
    """Rank 1 dies in its second update: the collective rank 0 waits in fails, and rank 0 saves step 1
    (its weights and every rank's RNG after it) on its own before the job ends."""
    out = tmp_path / "run"
    r = run("fail-rank-1-at-2", args_for(built, four_prompts, out, "--save-every", 1000, "--max-steps", 5), ranks=2)
    assert r.returncode != 0 and "rank 1 failed on purpose" in r.stderr
    assert checkpoints_on_disk(out) == [1], r.stderr[-2000:]
    r = run("none", args_for(built, four_prompts, out, "--save-every", 1000, "--resume", "--max-steps", 2), ranks=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_ranks_resume_the_checkpoint_rank_0_chose_and_the_same_weights(built, four_prompts, tmp_path):
    """Rank 1 would find an older checkpoint on its own (a lagging view of a shared filesystem): every
    rank resumes rank 0's choice, exactly. A rank whose copy of the weights differs stops the job in
    one line instead of training on silently."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run("none", args_for(built, four_prompts, whole, "--max-steps", 4), ranks=2).returncode == 0
    assert run("none", args_for(built, four_prompts, parts, "--max-steps", 3, "--save-every", 1,
                                "--keep-checkpoints", 3), ranks=2).returncode == 0
    r = run("rank1-sees-older", args_for(built, four_prompts, parts, "--max-steps", 4, "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(whole), metrics(parts)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for k in ("reward_mean", "cme_mean", "len_mean", "loss", "grad_norm"):
        assert a[3][k] == pytest.approx(b[3][k], rel=1e-5, abs=1e-7), k
    r = run("rank1-other-weights", args_for(built, four_prompts, parts, "--max-steps", 5, "--resume"), ranks=2)
    assert r.returncode != 0 and "--resume: rank 1 loaded other weights or another step" in r.stderr
    assert len(metrics(parts)) == 4  # nothing trained
