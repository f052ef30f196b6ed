"""Run train.py's main with a test hook, under torchrun or plain python (tests/test_distributed.py,
tests/test_reliability.py).

    python tests/dist_hooks.py HOOK [train.py arguments]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_hooks.py HOOK [arguments]

HOOK:
  none          train.py as it is.
  group-seeded  each prompt group is sampled from a seed of its own (the prompt and how many times it
                has been sampled), so a step's rollouts are the same whichever rank samples them: one
                process and two ranks then train on identical rollouts.
  fail-rank-1   rank 1 raises in its first policy update (the others must not hang).
  fail-rank-1-at-2
                rank 1 raises in its second policy update: rank 0 holds one complete step.
  stop-at:N:TARGET:SIG:S:FILE
                a stop, sent from rank 1 when its N-th step's update is done (so at a known point, not
                raced by a poller): SIG (SIGTERM or SIGINT) to TARGET, which is rank1 (itself: a
                signal to one worker), agent (torchrun's agent alone: Ctrl-C in its terminal, or a
                kill aimed at the launcher; the workers run in sessions of their own) or all (the agent
                and every worker: a scheduler's cancel, which signals every process of the job).
                From then on every checkpoint write sleeps S seconds first (a big model on a slow
                disk), FILE marking it for the other ranks.
  kill-at:N    SIGKILL to itself when the N-th step's update is done, before that step is logged or
                checkpointed (a kill at a known point, not raced by a poller).
  rank1-sees-older
                on resume, rank 1's own search for the newest intact checkpoint finds the one before
                it (a node whose view of a shared filesystem lags).
  rank1-other-weights
                on resume, rank 1's weights differ slightly from the checkpoint's (a stale copy).
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import sampling as S  # noqa: E402
import train as T  # noqa: E402


def group_seeded(real_generate):
    seen: dict = {}

    def generate(model, tokenizer, prompts, cfg, eos_ids, device, **kw):
        parts = []
        for p in prompts:
            seen[p] = seen.get(p, 0) + 1
            torch.manual_seed(int(hashlib.sha256(f"{p}|{seen[p]}".encode()).hexdigest()[:12], 16))
            parts.append(real_generate(model, tokenizer, [p], cfg, eos_ids, device, **kw))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        width = max(r.response.shape[1] for r in parts)
        response = torch.cat([torch.nn.functional.pad(r.response, (0, width - r.response.shape[1]), value=pad)
                              for r in parts])
        mask = torch.cat([torch.nn.functional.pad(r.mask, (0, width - r.mask.shape[1])) for r in parts])
        return S.Rollout([x for r in parts for x in r.prompts], [x for r in parts for x in r.prompt_ids], response,
                         mask, torch.cat([r.truncated for r in parts]), [x for r in parts for x in r.texts])
    return generate


def fail_at(n: int, real):
    calls = []

    def update(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("rank 1 failed on purpose")
        return real(*a, **kw)
    return update


def stop_at(n: int, target: str, sig: str, seconds: float, marker: Path):
    real_refresh, real_save, calls = T.refresh_rollout_model, T.save_checkpoint, []

    def refresh(*a, **kw):
        real_refresh(*a, **kw)
        calls.append(1)
        if os.environ.get("RANK") == "1" and len(calls) == n:
            marker.touch()
            signum = getattr(signal, sig)
            agent = os.getppid()
            workers = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and (d / "stat").exists()
                       and int((d / "stat").read_text().rsplit(")", 1)[-1].split()[1]) == agent]
            for pid in {"rank1": [os.getpid()], "agent": [agent], "all": [agent, *workers]}[target]:
                os.kill(pid, signum)

    def save(*a, **kw):
        if marker.exists():
            time.sleep(seconds)
        return real_save(*a, **kw)
    T.refresh_rollout_model, T.save_checkpoint = refresh, save


def main() -> int:
    hook, args = sys.argv[1], sys.argv[2:]
    rank1 = os.environ.get("RANK") == "1"
    if hook == "group-seeded":
        T.generate = group_seeded(T.generate)
    elif hook in ("fail-rank-1", "fail-rank-1-at-2"):
        if rank1:
            T.policy_update = fail_at(2 if hook.endswith("at-2") else 1, T.policy_update)
    elif hook.startswith("stop-at:"):
        _, n, target, sig, seconds, marker = hook.split(":", 5)
        stop_at(int(n), target, sig, float(seconds), Path(marker))
    elif hook.startswith("kill-at:"):
        n, real_refresh, calls = int(hook.split(":")[1]), T.refresh_rollout_model, []

        def refresh(*a, **kw):
            real_refresh(*a, **kw)
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        T.refresh_rollout_model = refresh
    elif hook == "rank1-sees-older":
        if rank1:
            real_intact = T.intact_checkpoint

            def older(out, verbose=True):
                newest, _ = real_intact(out, verbose)
                step = int(newest.name.split("-")[1]) - 1
                return out / f"checkpoint-{step}", torch.load(out / f"checkpoint-{step}" / "training_state.pt",
                                                              weights_only=True)
            T.intact_checkpoint = older
    elif hook == "rank1-other-weights":
        if rank1:
            real_load = T.load_generator

            def stale(name, *a, **kw):
                model, *rest = real_load(name, *a, **kw)
                if "checkpoint-" in str(name):
                    with torch.no_grad():
                        next(model.parameters()).add_(1e-3)
                return (model, *rest)
            T.load_generator = stale
    elif hook != "none":
        raise SystemExit(f"unknown hook {hook!r}")
    return T.main(args)


if __name__ == "__main__":
    sys.exit(main())
