"""A check before a run, without ground truth: can the reward be gamed on these prompts?

    python gaming.py --gen Qwen/Qwen2.5-0.5B --verifier google/gemma-3-1b-it --prompts prompts.jsonl
    python gaming.py --fast                # tiny local models, a few prompts: the plumbing (what CI runs)
    python gaming.py report FILE           # the table again from an --out file's raw rewards

A user with open-ended prompts has no quiz (quiz.py) to tell whether CME-GRPO will make the model
better. What can be checked before spending a GPU: whether the reward already prefers a degenerate
response to the generator's own. For each prompt, the generator samples `--samples` responses (the
run's sampling: temperature 1, its chat template, its stop tokens), and four degenerate responses are
written (`degenerate`):
  - restated: the prompt itself, repeated back;
  - non-answer: a one-line reply that answers nothing ("I am not sure what you mean.");
  - loop: the first sentence of the generator's first sample, repeated to the length limit;
  - near-empty: "OK."
Each is scored by each reward GRPO would train on (train.score: Eq. 1 as the mean aligned token
reward of the response, Eq. 3, and rkl), and the table gives, per reward and degenerate kind, how
often the degenerate response's reward is above a sample's (over every (prompt, sample) pair; ties
count half). Above one half, GRPO will push the policy toward that response. The verdict names the
worst pair. Only the rewards are measured, no training is done.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from config import Config
from metrics import machine
from prompts import load_eval_prompts, read_prompt_file
from records import read_json, write_block
from reward import Verifier, load_causal_lm
from sampling import Rollout, chat_prefix, load_generator
from tiny import build_bytebpe, build_model, build_sentencepiece
from train import generate, score

KINDS = ("restated", "non-answer", "loop", "near-empty")
REWARDS = (("token", "Eq. 1"), ("sequence", "Eq. 3"), ("rkl", "rkl"))
NON_ANSWER = "I am not sure what you mean."
NEAR_EMPTY = "OK."
GAMEABLE = 0.5  # a degenerate response preferred to the generator's own more often than this


def first_sentence(text: str) -> str:
    """The first sentence of a text (up to its first . ! ? or line end), or the whole of it."""
    text = text.strip()
    m = re.search(r"^.*?[.!?](?=\s|$)|^[^\n]+", text)
    return (m.group(0) if m else text).strip()


def degenerate(prompt: str, sample: str, tokenizer, max_new_tokens: int) -> dict[str, str]:
    """The four degenerate responses to a prompt (module docstring); `sample`: the generator's first
    response, whose first sentence the loop repeats until it has max_new_tokens generator tokens."""
    sentence = first_sentence(sample) or NON_ANSWER
    loop = sentence
    while len(tokenizer(loop + " " + sentence, add_special_tokens=False).input_ids) <= max_new_tokens:
        loop = loop + " " + sentence
    return {"restated": prompt.strip(), "non-answer": NON_ANSWER, "loop": loop, "near-empty": NEAR_EMPTY}


def preference(degenerate_reward: np.ndarray, sample_reward: np.ndarray) -> float:
    """Share of (prompt, sample) pairs whose degenerate response has the higher reward (ties half).
    degenerate_reward: (P,) one per prompt; sample_reward: (P, S)."""
    d = degenerate_reward[:, None]
    return float(np.mean(np.where(d > sample_reward, 1.0, np.where(d == sample_reward, 0.5, 0.0))))


def rollout_of(prompts: list[str], responses: list[list[str]], tokenizer, eos: int, system_prompt,
               cut: list[list[bool]]) -> Rollout:
    """A Rollout holding given responses (each a group: one prompt's responses, in order), tokenized by
    the generator and ended by its EOS unless `cut` says the response ran to the limit."""
    rows, heads, texts, ended, owners = [], [], [], [], []
    for p, group, cuts in zip(prompts, responses, cut):
        head = tokenizer(chat_prefix(tokenizer, p, system_prompt), add_special_tokens=False).input_ids
        for text, was_cut in zip(group, cuts):
            ids = tokenizer(text, add_special_tokens=False).input_ids + ([] if was_cut else [eos])
            rows.append(ids)
            heads.append(head)
            texts.append(text)
            ended.append(not was_cut)
            owners.append(p)
    T = max(len(r) for r in rows)
    response = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]).bool()
    return Rollout(owners, heads, response, mask, ~torch.tensor(ended), texts)


def check(gen: str, verifier: str, prompts: list[str], samples: int = 4, max_new_tokens: int = 128,
          seed: int = 0, device: str = "cpu") -> dict:
    """The check on `prompts` (strings; module docstring). Returns {"prompts", "samples", "shares": {reward:
    {kind: share}}, "mean": {reward: mean rewards}, "settings" (models, limit, seed, machine, seconds),
    "asked": the prompts, "responses": per prompt its samples then its degenerate responses,
    "rewards": {reward: per prompt, each response's reward}}: the raw rewards behind every share."""
    start = time.perf_counter()
    dev = torch.device(device)
    model, tok, _, eos_ids = load_generator(gen, dev)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max_new_tokens >= context:  # the loop response is built up to this many tokens
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the generator's context is {context} tokens")
    v = Verifier(*load_causal_lm(verifier, device=dev))
    cfg = replace(Config(), gen=gen, verifier=verifier, group_size=samples, max_new_tokens=max_new_tokens,
                  micro_batch=samples, gen_batch=samples * len(prompts), seed=seed, device=device)
    torch.manual_seed(seed)
    sampled = generate(model, tok, prompts, cfg, eos_ids, dev)
    own = [sampled.texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]
    own_cut = [sampled.truncated[i * samples:(i + 1) * samples].tolist() for i in range(len(prompts))]
    made = [degenerate(p, o[0], tok, max_new_tokens) for p, o in zip(prompts, own)]
    groups = [o + [m[k] for k in KINDS] for o, m in zip(own, made)]
    cuts = [c + [k == "loop" for k in KINDS] for c in own_cut]
    rollout = rollout_of(prompts, groups, tok, eos_ids[0], cfg.system_prompt, cuts)
    n = samples + len(KINDS)
    rewards = {}
    for reward, _ in REWARDS:
        _, per_response, _, _ = score(rollout, replace(cfg, reward=reward, group_size=n), v, tok, model, dev)
        rewards[reward] = per_response.reshape(len(prompts), n).tolist()
    settings = {"gen": gen, "verifier": verifier, "max_new_tokens": max_new_tokens, "seed": seed,
                "machine": machine(device), "seconds": round(time.perf_counter() - start, 1)}
    return {"prompts": len(prompts), "samples": samples, **summarise(rewards, samples), "settings": settings,
            "asked": prompts, "responses": groups, "rewards": rewards}


def summarise(rewards: dict[str, list], samples: int) -> dict:
    """The table's numbers from the raw rewards: {"shares": {reward: {kind: share}}, "mean": {reward:
    {"samples" or kind: mean reward}}}. rewards: {reward: (P, samples + len(KINDS)) nested lists, each
    prompt's samples then its degenerate responses in KINDS order}."""
    out = {"shares": {}, "mean": {}}
    for reward, rows in rewards.items():
        r = np.asarray(rows, dtype=np.float64)
        out["shares"][reward] = {k: preference(r[:, samples + j], r[:, :samples]) for j, k in enumerate(KINDS)}
        out["mean"][reward] = {"samples": float(r[:, :samples].mean()),
                               **{k: float(r[:, samples + j].mean()) for j, k in enumerate(KINDS)}}
    return out


def table(result: dict) -> str:
    """The check as a markdown table and a one-line verdict (after a line naming the models and the
    machine, where `result` has its settings)."""
    lines, st = [], result.get("settings")
    if st:
        gen, ver = (Path(st[k]).name if Path(st[k]).is_absolute() else st[k] for k in ("gen", "verifier"))  # local folders
        lines = [f"{gen} sampling, {ver} as the verifier, up to {st['max_new_tokens']} new tokens; "
                 f"{st['seconds'] / 60:.0f} minutes on {st['machine']}.", ""]
    lines += [f"How often each reward prefers a degenerate response to the generator's own ({result['prompts']} "
             f"prompts x {result['samples']} samples; above 50%, GRPO pushes toward it):", "",
             "| reward | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for reward, label in REWARDS:
        lines.append(f"| {label} | " + " | ".join(f"{result['shares'][reward][k]:.0%}" for k in KINDS) + " |")
    worst = max(((result["shares"][r][k], label, k) for r, label in REWARDS for k in KINDS))
    lines += ["", verdict(worst)]
    return "\n".join(lines)


def verdict(worst: tuple[float, str, str]) -> str:
    share, label, kind = worst
    if share > GAMEABLE:
        return (f"verdict: gameable: {label} prefers the {kind} response to the generator's own {share:.0%} of the "
                "time; expect the run to learn it")
    return (f"verdict: not gameable by these four: no reward prefers a degenerate response more than half the time "
            f"(the most: {label}, {kind}, {share:.0%})")


def build_fast(world: Path) -> tuple[str, str, list[str]]:
    """Tiny local models and prompts for the fast mode (random weights: the plumbing only)."""
    prompts = [f"Tell me one thing about the number {i}." for i in range(4)]
    if not (world / "verifier" / "config.json").exists():
        corpus = prompts + ["It is a number. I am not sure what you mean. OK."] * 4
        build_bytebpe(world / "gen_tok", corpus, vocab_size=300)
        build_sentencepiece(world / "ver_tok", corpus, gemma=True, vocab_size=300)
        build_model(world / "generator", world / "gen_tok", "qwen2", seed=1)
        build_model(world / "verifier", world / "ver_tok", "gemma3", seed=2)
    return str(world / "generator"), str(world / "verifier"), prompts


def report_main(argv: list[str]) -> int:
    """`python gaming.py report FILE [FILE ...] [--docs PAGE]`: the tables again from --out files, each
    share recomputed from the raw rewards; printed, or written between `<!-- gaming report: FILE -->`
    and `<!-- /gaming report -->` in PAGE."""
    ap = argparse.ArgumentParser(prog="gaming.py report", description="The check's tables from its --out files.")
    ap.add_argument("files", nargs="+", help="JSON files written by gaming.py --out")
    ap.add_argument("--docs", help="write each table into this page between its markers instead of printing it")
    args = ap.parse_args(argv)
    try:
        for f in args.files:
            result = read_json(f)
            if "rewards" not in result:
                raise ValueError(f"{f}: no raw rewards (not a gaming.py --out file)")
            text = table({**result, **summarise(result["rewards"], result["samples"])}) + "\n"
            if args.docs:
                write_block(args.docs, "gaming report", f, text)
            else:
                print(text)
    except (ValueError, OSError) as e:  # a missing or malformed file, a page without the marker
        print(f"gaming.py report: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    ap = argparse.ArgumentParser(description="Before a run: how often the reward prefers a degenerate response "
                                             "(the prompt restated, a non-answer, a loop, a near-empty reply) to "
                                             "the generator's own samples.")
    ap.add_argument("--gen", default="Qwen/Qwen2.5-0.5B", help="generator: hub id or local folder (default %(default)s)")
    ap.add_argument("--verifier", default="google/gemma-3-1b-it", help="verifier (default %(default)s)")
    ap.add_argument("--prompts", default="alpaca_eval",
                    help="'alpaca_eval' (the hub's 805) or a local .jsonl/.json/.txt (default %(default)s)")
    ap.add_argument("--num-prompts", type=int, default=32, help="the first N prompts (default %(default)s)")
    ap.add_argument("--samples", type=int, default=4, help="generator samples per prompt (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="response limit (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    ap.add_argument("--out", help="also write the numbers as JSON here")
    ap.add_argument("--fast", action="store_true", help="tiny local models built in --out (or a temporary folder)")
    args = ap.parse_args(argv)
    try:
        for flag in ("num_prompts", "samples", "max_new_tokens"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
        if args.fast:
            import tempfile
            world = Path(args.out).parent / "world" if args.out else Path(tempfile.mkdtemp())
            gen, ver, prompts = build_fast(world)
            args.samples, args.max_new_tokens = 2, 12
        else:
            gen, ver = args.gen, args.verifier
            if args.prompts == "alpaca_eval":
                prompts = [r["instruction"] for r in load_eval_prompts(args.prompts)]
            else:
                if not Path(args.prompts).is_file():
                    raise ValueError(f"prompt file not found: {args.prompts}")
                prompts = read_prompt_file(Path(args.prompts), "instruction")
            prompts = [p for p in prompts if p and p.strip()][:args.num_prompts]
            if not prompts:
                raise ValueError(f"{args.prompts}: no prompts")
        result = check(gen, ver, prompts, args.samples, args.max_new_tokens, args.seed, args.device)
        print(table(result))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    except (ValueError, OSError) as e:  # bad values, a model that cannot load, an --out that cannot be written
        print(f"gaming.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
