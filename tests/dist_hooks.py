"""Run train.py's main with a test hook, under torchrun or plain python (tests/test_distributed.py).

    python tests/dist_hooks.py HOOK [train.py arguments]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_hooks.py HOOK [arguments]

HOOK:
  none          train.py as it is.
  group-seeded  each prompt group is sampled from a seed of its own (the prompt and how many times it
                has been sampled), so a step's rollouts are the same whichever rank samples them: one
                process and two ranks then train on identical rollouts.
  fail-rank-1   rank 1 raises in its first policy update (the others must not hang).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import sampling as S  # noqa: E402
import train as T  # noqa: E402


def group_seeded(real_generate):
    seen: dict = {}

    def generate(model, tokenizer, prompts, cfg, eos_ids, device):
        parts = []
        for p in prompts:
            seen[p] = seen.get(p, 0) + 1
            torch.manual_seed(int(hashlib.sha256(f"{p}|{seen[p]}".encode()).hexdigest()[:12], 16))
            parts.append(real_generate(model, tokenizer, [p], cfg, eos_ids, device))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        width = max(r.response.shape[1] for r in parts)
        response = torch.cat([torch.nn.functional.pad(r.response, (0, width - r.response.shape[1]), value=pad)
                              for r in parts])
        mask = torch.cat([torch.nn.functional.pad(r.mask, (0, width - r.mask.shape[1])) for r in parts])
        return S.Rollout([x for r in parts for x in r.prompts], [x for r in parts for x in r.prompt_ids], response,
                         mask, torch.cat([r.truncated for r in parts]), [x for r in parts for x in r.texts])
    return generate


def main() -> int:
    hook, args = sys.argv[1], sys.argv[2:]
    if hook == "group-seeded":
        T.generate = group_seeded(T.generate)
    elif hook == "fail-rank-1" and os.environ.get("RANK") == "1":
        def fail(*a, **kw):
            raise RuntimeError("rank 1 failed on purpose")
        T.policy_update = fail
    elif hook not in ("none", "fail-rank-1"):
        raise SystemExit(f"unknown hook {hook!r}")
    return T.main(args)


if __name__ == "__main__":
    sys.exit(main())
