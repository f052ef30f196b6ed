"""The offline toy world: CME-GRPO in miniature, judged by ground truth; and CME-GRPO on real small
models on a laptop.

    python demo.py                    # the toy world, about 3 minutes on 2 CPU cores
    python demo.py --seed 1           # another world
    python demo.py spread runs/*/demo.json   # many runs: each column's range, how many meet the margins
    python demo.py real               # real small models (SmolLM2-135M-Instruct, gemma-3-270m-it)

1. A small synthetic language: prompts ask about a subject in four phrasings ("What does the cat
   do?"); answers are 1-2 sentences "SUBJECT VERB OBJECT TAIL." about it. The world knows for certain
   whether a response is grammatical and on the prompt's topic (`ground_truth`); training never
   looks at that.
2. A tiny *verifier* (Gemma3 architecture, SentencePiece-style BPE with byte fallback) is trained on
   the language for a few seconds: fluent, on-topic text is now unsurprising to it.
3. A tiny *generator* of another family (Qwen2 architecture, byte-level BPE: the two tokenizers
   differ, so Eq. 1's character alignment is really exercised) is pre-trained on a "base model" mix:
   some answers on topic, some about another subject, many in scrambled word order.
4. CME-GRPO (token-level reward, Eq. 1, with the end of the response scored: `--eos-reward`) trains the generator on half the prompts with the real
   `train.train`; then the same run with two controls: `--verifier-init random` (Section 4's control)
   and `--verifier-init uniform`, where every verifier token costs log V, so the reward is pure
   granularity (how many verifier tokens each generator token covers), which is what a random
   verifier mostly rewards.
5. Before/after table on the other half of the prompts: mean CME under the *trained* verifier beside
   the ground truth (grammatical share, on-topic share, distinct-1/2, length). CME-GRPO's rise in
   the ground truth is the claim in miniature; the drift it also shows (shorter answers, more
   repeated words) is the one the paper's Limitations section names. Curves go to demo.png.

`python demo.py real` runs the same comparison (CME-GRPO against the random-verifier control) on real
models with prompts split into training and held-out parts, and reports what can be checked without a
judge (`response_stats`). The tokenizer and model builders are tiny.py's.
"""
from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from config import Config
from evaluate import run_generate
from metrics import compression_ratio, mean_distinct, read_metrics
from prompts import load_eval_prompts, read_prompt_file
from records import read_jsonl
from reward import Verifier, load_causal_lm
from sampling import chat_prefix, load_generator, sample
from tiny import build_bytebpe, build_model, build_sentencepiece
from train import train

# --- the toy language --------------------------------------------------------------------------------

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "a child", "the farmer", "our neighbour"]
VERBS = ["sees", "likes", "helps", "finds", "follows", "calls", "paints", "visits"]
OBJECTS = ["the ball", "a tree", "the house", "the river", "a book", "the garden", "the moon", "a boat"]
TAILS = [".", " today.", " again.", " in the morning.", " every day."]
ASKS = ["Tell me about {}.", "Write about {}.", "What does {} do?", "Describe {}, please."]
PROMPTS = [ask.format(s) for s in SUBJECTS for ask in ASKS]
# RL trains on half the prompts, two phrasings per subject; the other half is held out for evaluation
TRAIN_PROMPTS = [ask.format(s) for i, s in enumerate(SUBJECTS) for ask in (ASKS * 2)[i % 4:i % 4 + 2]]
HELD_OUT = [p for p in PROMPTS if p not in TRAIN_PROMPTS]


def toy_pair(rng: random.Random, subject: str) -> tuple[str, str]:
    """A (prompt, response) pair of the toy language: 1-2 sentences about the subject."""
    n = rng.choice([1, 2])
    response = " ".join(f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}" for _ in range(n))
    return rng.choice(ASKS).format(subject), response


def scrambled(rng: random.Random, response: str) -> str:
    """The words (and full stops) of a response in random order: the vocabulary without the grammar."""
    words = response.replace(".", " .").split()
    rng.shuffle(words)
    return " ".join(words)


def base_pair(rng: random.Random, subject: str) -> tuple[str, str]:
    """What the generator is pre-trained on (a "base model"): a third of its responses are the toy
    language on topic, a quarter are grammatical but about another subject, the rest are the words
    in scrambled order. Good answers are in its distribution, not often: GRPO's raw material."""
    prompt, _ = toy_pair(rng, subject)
    u = rng.random()
    if u < 0.35:
        return prompt, toy_pair(rng, subject)[1]
    other = rng.choice([s for s in SUBJECTS if s != subject])
    if u < 0.6:
        return prompt, toy_pair(rng, other)[1]
    return prompt, scrambled(rng, toy_pair(rng, rng.choice([subject, other]))[1])


# --- the toy world's ground truth --------------------------------------------------------------------

def _alternatives(words: list[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"


SENTENCE = f"{_alternatives(SUBJECTS)} {_alternatives(VERBS)} {_alternatives(OBJECTS)}{_alternatives(TAILS)}"
GRAMMATICAL = re.compile(f"{SENTENCE}(?: {SENTENCE})*")
SUBJECT = re.compile(rf"\b{_alternatives(SUBJECTS)}\b")


def prompt_subject(prompt: str) -> str:
    """The subject a toy prompt asks about: "What does the cat do?" -> "the cat"."""
    return SUBJECT.search(prompt).group(0)


def ground_truth(prompts: list[str], responses: list[str]) -> dict:
    """What the toy world knows for certain about N responses (the demo never trains on these).

    grammatical: share of responses that are one or more sentences of the language, nothing else.
    on_topic: share whose subjects (at least one) are all the prompt's subject, grammatical or not.
    distinct_1, distinct_2: mean over responses of within-response distinct-n (1.0 = no word repeats).
    unique: share of distinct responses among the N (mode collapse shows here, not in distinct-n).
    words: mean length in words.
    """
    grammatical = [GRAMMATICAL.fullmatch(r.strip()) is not None for r in responses]
    on_topic = []
    for p, r in zip(prompts, responses):
        found = SUBJECT.findall(r)
        on_topic.append(bool(found) and set(found) == {prompt_subject(p)})
    words = [r.replace(".", " .").split() for r in responses]
    return {"grammatical": float(np.mean(grammatical)), "on_topic": float(np.mean(on_topic)),
            "distinct_1": mean_distinct(words, 1), "distinct_2": mean_distinct(words, 2),
            "unique": len(set(responses)) / len(responses) if responses else float("nan"),
            "words": float(np.mean([len(w) for w in words]))}


def train_lm(path: Path, make_pair, seed: int, steps: int = 300, lr: float = 3e-3) -> None:
    """Next-token training on (prompt, response + EOS) pairs after the chat template, loss on responses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(32):
            p, r = make_pair(rng, rng.choice(SUBJECTS))
            head = tok(chat_prefix(tok, p), add_special_tokens=False).input_ids
            body = tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id]
            rows.append(head + body)
            labels.append([-100] * len(head) + body)
        L = max(len(x) for x in rows)
        x = torch.tensor([x + [pad] * (L - len(x)) for x in rows])
        y = torch.tensor([y + [-100] * (L - len(y)) for y in labels])
        attn = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
        loss = model(input_ids=x, attention_mask=attn, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)


def held_out(model_path: Path, verifier, seed: int, samples: int = 8, max_new_tokens: int = 32) -> dict:
    """A generator's samples on the held-out prompts, scored by the toy world and by `verifier`.

    Returns ground_truth(...) plus "cme" (mean Eq. 3 CME under `verifier`, nats/token), "cme_each"
    ((N,) float64), "truncated" (share without EOS) and "pairs" (the N (prompt, response) pairs)."""
    device = torch.device("cpu")
    model, tok, _, eos_ids = load_generator(str(model_path), device)
    torch.manual_seed(seed)
    rollout = sample(model, tok, HELD_OUT, samples, eos_ids, device, max_new_tokens=max_new_tokens, batch_size=256)
    cme = verifier.sequence_cme(rollout.prompts, rollout.texts)
    return {**ground_truth(rollout.prompts, rollout.texts), "cme": float(np.nanmean(cme)), "cme_each": cme,
            "truncated": float(rollout.truncated.float().mean()), "pairs": list(zip(rollout.prompts, rollout.texts))}


# --- the demo ----------------------------------------------------------------------------------------

def build_world(world: Path, seed: int, generator_steps: int = 1000) -> Path:
    """Build the toy world under `world`: the two tokenizers, the verifier trained on the toy language,
    the base generator trained on base_pair, and prompts.txt (the RL prompts). Returns `world`."""
    rng = random.Random(seed)
    corpus = [" ".join(toy_pair(rng, rng.choice(SUBJECTS))) for _ in range(400)]
    print("building the toy world: tokenizers, a verifier trained on the toy language, a generator trained on "
          "a mix of on-topic, off-topic and scrambled answers", flush=True)
    build_sentencepiece(world / "ver_tok", corpus, gemma=True, vocab_size=300)
    build_bytebpe(world / "gen_tok", corpus + ["1 2 3, ok? !", "{x: [y]}"], vocab_size=400)
    build_model(world / "verifier", world / "ver_tok", "gemma3", seed=seed, hidden=64, head_init=0.0)
    train_lm(world / "verifier", toy_pair, seed)
    build_model(world / "generator", world / "gen_tok", "qwen2", seed=seed + 1, hidden=64, head_init=0.0)
    train_lm(world / "generator", base_pair, seed + 1, steps=generator_steps)
    (world / "prompts.txt").write_text("".join(f"{p}\n" for p in TRAIN_PROMPTS))
    return world


DEMO_STEPS = 160
RUNS = (("trained", "pretrained", "CME-GRPO, trained verifier"),
        ("random", "random", "control: random-weight verifier"),
        ("uniform", "uniform", "control: granularity only"))
COLUMNS = (("cme", "CME", "{:6.2f}"), ("grammatical", "gramm.", "{:6.0%}"), ("on_topic", "topic", "{:6.0%}"),
           ("distinct_1", "dist-1", "{:6.2f}"), ("distinct_2", "dist-2", "{:6.2f}"), ("unique", "unique", "{:6.0%}"),
           ("words", "words", "{:6.1f}"))


def run_demo(cfg, steps: int | None = None, lr: float = 3e-4) -> dict:
    """Build the toy world, run CME-GRPO with the trained verifier and the two controls, print the table.

    cfg: a config.Config; its seed, out (default runs/demo) and max_steps (default DEMO_STEPS) are used.
    Returns {"before": ..., "resampled": ..., "trained": ..., "random": ..., "uniform": ...}: each the
    held_out(...) dict of that generator (before training; before, another sampling seed; after each
    run), plus "<run>_curve": the run's per-step mean CME of its rollouts under the trained verifier.
    """
    out = Path(cfg.out if cfg.out != Config.out else "runs/demo")
    steps = steps or cfg.max_steps or DEMO_STEPS
    seed = cfg.seed
    world = build_world(out / "world", seed)
    train_prompts = world / "prompts.txt"

    vmodel, vtok = load_causal_lm(str(world / "verifier"), dtype=torch.float32, device="cpu")
    judge = Verifier(vmodel, vtok)
    results = {"before": held_out(world / "generator", judge, seed),
               "resampled": held_out(world / "generator", judge, seed + 1000)}  # sampling noise alone

    # --eos-reward: Eq. 1 gives EOS no reward, so nothing rewards stopping, and a response's late tokens
    # are compared only with the other responses still writing; length then drifts unopposed, and one
    # run in four fell away late (seed 0 on one thread: the truncated share went from 0% to 30-44% in
    # its last 25 steps, answers twice as long, "...the moon. . bird paints the house. a in tree").
    # The verifier was trained with its end-of-turn token after every answer, so scoring the ending
    # rewards stopping where a sentence ends (docs/demo.md measures both over 20 runs).
    base = replace(cfg, gen=str(world / "generator"), verifier=str(world / "verifier"),
                   prompts=str(train_prompts), reward="token", eos_reward=True, group_size=8, prompts_per_step=4,
                   micro_batch=32, gen_batch=256, max_new_tokens=32, lr=lr, warmup_steps=2, epochs=-(-steps // 3),
                   max_steps=steps, sample_every=0, save_every=10 ** 9, device="cpu", resume=False)

    def judged(step, rollout):  # the step's rollouts under the trained verifier: one axis for every run
        return {"judge_cme": float(np.nanmean(judge.sequence_cme(rollout.prompts, rollout.texts)))}

    for name, init, label in RUNS:
        print(f"\nCME-GRPO, {label.split(': ')[-1]} ({steps} steps)", flush=True)
        run_out = out / f"{name}-verifier"
        history = train(replace(base, verifier_init=init, out=str(run_out)), on_step=judged)
        results[name] = held_out(run_out / f"checkpoint-{steps}", judge, seed)
        results[f"{name}_curve"] = [h["judge_cme"] for h in history]

    print(table(results))
    (out / "demo.json").write_text(json.dumps(
        {"seed": seed, "threads": torch.get_num_threads(), "steps": steps,
         **{name: {k: results[name][k] for k, _, _ in COLUMNS} for name in ("before", "resampled", *(r[0] for r in RUNS))}},
        indent=1))
    for name, label in (("before", "before training"), ("trained", "after, trained verifier"),
                        ("random", "after, random verifier"), ("uniform", "after, granularity only")):
        print(f"\n{label}:")
        for cme, (prompt, response) in list(zip(results[name]["cme_each"], results[name]["pairs"]))[:96:32]:
            print(f"  CME {cme:5.2f}  {prompt!r} -> {response!r}")
    _plot(results, out / "demo.png")
    print(f"curves: {out / 'demo.png'}")
    return results


def spread(paths: list[str]) -> str:
    """The demo over many runs (the demo.json of each): per row, the range of each column, and how many
    runs meet the margins the demo's test asserts (MARGINS)."""
    runs = []
    for p in paths:
        try:
            runs.append(json.loads(Path(p).read_text()))
            runs[-1]["trained"]["grammatical"], runs[-1]["seed"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ValueError(f"{p}: not a demo.json (the file `python demo.py` writes in its --out)") from None
    if not runs:
        raise ValueError("no demo.json files given")
    rows = [("before", "before training"), ("resampled", "before, another sampling seed")]
    rows += [(name, f"after {label}") for name, _, label in RUNS]
    lines = [f"{len(runs)} runs: seeds {sorted({r['seed'] for r in runs})}, threads {sorted({r['threads'] for r in runs})}",
             f"{'generator':<40}" + "".join(f"{h:>14}" for _, h, _ in COLUMNS)]
    for name, label in rows:
        cells = []
        for k, _, f in COLUMNS:
            lo, hi = min(r[name][k] for r in runs), max(r[name][k] for r in runs)
            cells.append(f"{f.format(lo).strip()}-{f.format(hi).strip()}")
        lines.append(f"{label:<40}" + "".join(f"{c:>14}" for c in cells))
    lines.append("")
    for what, ok in margins(runs).items():
        lines.append(f"{what}: {ok} of {len(runs)}")
    gain = {k: min(r["trained"][k] - r["before"][k] for r in runs) for k in ("grammatical", "on_topic")}
    lead = min(r["trained"][k] - r[c][k] for r in runs for c in ("random", "uniform") for k in ("grammatical", "on_topic"))
    lines.append(f"smallest gains over the base: {gain['grammatical']:+.0%} grammatical, {gain['on_topic']:+.0%} on topic; "
                 f"smallest lead over a control: {lead:+.0%}")
    return "\n".join(lines)


MARGINS = {"grammatical": 0.20, "on_topic": 0.35, "over_controls": 0.50}
"""What the demo claims, in points of share: the trained-verifier run's gain over the base model in
grammatical and on-topic responses, and its lead over each control in both."""


def margins(runs: list[dict]) -> dict:
    """How many demo runs (demo.json contents) meet each margin of MARGINS."""
    def over_base(r, k):
        return r["trained"][k] - r["before"][k] >= MARGINS[k]

    def over_controls(r):
        return all(r["trained"][k] - r[c][k] >= MARGINS["over_controls"]
                   for c in ("random", "uniform") for k in ("grammatical", "on_topic"))
    return {f"at least {MARGINS['grammatical']:.0%} more grammatical than the base":
                sum(over_base(r, "grammatical") for r in runs),
            f"at least {MARGINS['on_topic']:.0%} more on topic than the base": sum(over_base(r, "on_topic") for r in runs),
            f"at least {MARGINS['over_controls']:.0%} more grammatical and on topic than both controls":
                sum(over_controls(r) for r in runs)}


def table(results: dict) -> str:
    """The demo's table: CME under the trained verifier and the toy world's ground truth."""
    n = len(results["before"]["pairs"])
    lines = [f"\nheld-out prompts ({n} samples per row, {len(HELD_OUT)} prompts CME-GRPO never trained on): CME = "
             "mean Eq. 3 under the trained verifier (nats/token, lower = less surprising); the rest is the toy "
             "world's ground truth",
             f"{'generator':<40}" + "".join(f"{h:>8}" for _, h, _ in COLUMNS)]
    rows = [("before", "before training"), ("resampled", "before, another sampling seed")]
    for name, _, label in RUNS:
        rows.append((name, f"after {label}"))
    for name, label in rows:
        lines.append(f"{label:<40}" + "".join(f"{f.format(results[name][k]):>8}" for k, _, f in COLUMNS))
    return "\n".join(lines)


def _plot(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, _, label in RUNS:
        ax.plot(range(1, len(results[f"{name}_curve"]) + 1), results[f"{name}_curve"], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("CME of rollouts under trained verifier")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# --- the real small models on a laptop ---------------------------------------------------------------

REAL_GEN, REAL_VERIFIER = "HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m-it"


def response_stats(prompts: list[str], outputs: list[str], truncated: list[bool], verifier) -> dict:
    """What one can check of N real responses without a judge.

    prompts, outputs: N strings; truncated: N bools (no EOS within the token limit); verifier: a
    reward.Verifier. Returns {cme (mean Eq. 3, nats/token), words (mean), distinct_1, distinct_2 (mean
    within-response distinct-n over lower-cased words), compression (mean zlib-compressed / raw UTF-8
    bytes: repetition that has no spaces, "kakakaka", shows here and not in distinct-n), truncated
    (share), empty (count)}."""
    cme = verifier.sequence_cme(prompts, outputs)
    words = [o.lower().split() for o in outputs]
    ratios = [compression_ratio(o) for o in outputs if o]
    return {"cme": float(np.nanmean(cme)), "words": float(np.mean([len(w) for w in words])),
            "compression": float(np.mean(ratios)) if ratios else float("nan"),
            "distinct_1": mean_distinct(words, 1), "distinct_2": mean_distinct(words, 2),
            "truncated": float(np.mean(truncated)), "empty": int(np.isnan(cme).sum())}


def split_prompts(source: str, held_out: int, seed: int, field: str = "instruction") -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) of a prompt source, deduplicated and split with the seed.

    source: "alpaca_eval" (the 805 AlpacaEval instructions, from the hub) or a local .jsonl / .json /
    .txt file (train.py's formats; `field` names the prompt in JSON objects)."""
    if source == "alpaca_eval":
        raw = [r["instruction"] for r in load_eval_prompts(source)]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        raw = read_prompt_file(path, field)
    prompts = list(dict.fromkeys(p.strip() for p in raw if p and p.strip()))
    random.Random(seed).shuffle(prompts)
    if len(prompts) < held_out + 2:
        raise ValueError(f"{source}: {len(prompts)} distinct prompts; --held-out {held_out} needs at least "
                         f"{held_out + 2} (two to train on)")
    return prompts[held_out:], prompts[:held_out]


def run_real(gen: str = REAL_GEN, verifier: str = REAL_VERIFIER, prompts: str = "alpaca_eval",
             out: str = "runs/real-demo", held_out: int = 32, steps: int = 40, seed: int = 0,
             lr: float = 2e-5, group_size: int = 4, prompts_per_step: int = 2, max_new_tokens: int = 96,
             device: str = "cpu", precision: str = "auto") -> dict:
    """CME-GRPO on real models, small enough for a laptop: before/after on held-out prompts, with the
    random-verifier control. Every stage is skipped when its output exists, so a rerun continues.

    precision: "bf16" samples rollouts from a bf16 copy of the policy and runs the verifier in bf16 (the
    paper's verifier dtype; the update stays fp32), "fp32" runs everything in fp32, "auto" is bf16 where
    the hardware has native bf16 (a GPU, or a CPU with AVX512-BF16/AMX) and fp32 elsewhere. The table's
    own CME column is always scored in fp32 on a CPU.

    Returns {"before"|"trained"|"random": response_stats(...) of that generator's greedy outputs,
    "samples": three (prompt, before, after) triples, "seconds_per_step": {"trained", "random"}}.
    """
    if precision == "auto":
        precision = "bf16" if device != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, held = split_prompts(prompts, held_out, seed)
    held_file, train_file = out / "held_out.jsonl", out / "train_prompts.jsonl"
    held_file.write_text("".join(json.dumps({"index": i, "instruction": p}) + "\n" for i, p in enumerate(held)))
    train_file.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in train_prompts))
    print(f"{len(train_prompts)} training prompts, {len(held)} held out ({out})", flush=True)

    cfg = replace(Config(), gen=gen, verifier=verifier, prompts=str(train_file), reward="token", seed=seed,
                  group_size=group_size, prompts_per_step=prompts_per_step, micro_batch=group_size,
                  gen_batch=group_size * prompts_per_step, max_new_tokens=max_new_tokens, lr=lr, warmup_steps=2,
                  max_steps=steps, save_every=steps, sample_every=0, device=device, verifier_dtype=precision,
                  rollout_dtype=precision)
    models, seconds = {"before": gen}, {}
    for name, init in (("trained", "pretrained"), ("random", "random")):
        run_out = out / f"{name}-verifier"
        final = run_out / f"checkpoint-{steps}"
        if not final.is_dir():
            print(f"\nCME-GRPO, {name} verifier: {steps} steps", flush=True)
            resume = any(run_out.glob("checkpoint-*"))
            train(replace(cfg, verifier_init=init, out=str(run_out), resume=resume))
        logged = read_metrics(run_out / "metrics.jsonl")
        seconds[name] = {k: float(np.mean([m[f"time_{k}" if k != "step" else "step_time"] for m in logged]))
                         for k in ("step", "gen", "score", "update")}
        models[name] = str(final)

    vmodel, vtok = load_causal_lm(verifier, device=device)
    judge = Verifier(vmodel, vtok)
    results, records = {}, {}
    for name, model in models.items():
        path = out / f"{name}.outputs.jsonl"
        run_generate(model, path, prompts_source=str(held_file), max_new_tokens=max_new_tokens, batch_size=8,
                     name=name, device=device)
        rows = records[name] = sorted(read_jsonl(path), key=lambda r: r["index"])
        results[name] = response_stats([r["instruction"] for r in rows], [r["output"] for r in rows],
                                       [r["truncated"] for r in rows], judge)
    results["samples"] = [(b["instruction"], b["output"], a["output"])
                          for b, a in list(zip(records["before"], records["trained"]))[:3]]
    results["seconds_per_step"] = seconds
    results["precision"] = precision
    (out / "report.json").write_text(json.dumps(results, indent=1))
    report = real_table(results, Path(verifier).name if Path(verifier).is_dir() else verifier, len(held))
    (out / "report.md").write_text(report + "\n")
    print(report)
    return results


def real_table(results: dict, verifier: str, n: int) -> str:
    """The real-model run's before/after table (markdown) and its sample pairs."""
    lines = [f"Greedy outputs on {n} held-out prompts. CME: mean Eq. 3 under {verifier} (nats/token, lower = "
             "less surprising to it); distinct-n within each response; compression: zlib bytes / raw bytes (lower = "
             "more repetitive); truncated: no EOS within the limit.", "",
             "| generator | CME | words | distinct-1 | distinct-2 | compression | truncated |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("before", "before"), ("trained", "after CME-GRPO"), ("random", "after, random verifier")):
        r = results[name]
        lines.append(f"| {label} | {r['cme']:.3f} | {r['words']:.1f} | {r['distinct_1']:.3f} | "
                     f"{r['distinct_2']:.3f} | {r['compression']:.3f} | {r['truncated']:.0%} |")
    for name, t in results["seconds_per_step"].items():
        lines.append(f"\n{name} run: {t['step']:.1f} s per step (generation {t['gen']:.1f}, verifier "
                     f"{t['score']:.1f}, update {t['update']:.1f}; rollouts and verifier in {results['precision']})")
    for prompt, before, after in results["samples"]:
        lines += ["", f"**{prompt}**", "", f"- before: {before!r}", f"- after: {after!r}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="The offline toy world (`toy`, the default), or CME-GRPO on real small "
                                             "models with a before/after table (`real`).")
    sub = ap.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="the offline toy world")
    toy.add_argument("--seed", type=int, default=0,
                     help="seed of the world, its models and the runs (default %(default)s)")
    toy.add_argument("--out", default="runs/demo", help="run folder (default %(default)s)")
    toy.add_argument("--steps", type=int, default=DEMO_STEPS, help="optimizer steps of each run (default %(default)s)")
    many = sub.add_parser("spread", help="the toy world over many runs: the range of each column, and how many "
                                         "runs meet the demo's margins")
    many.add_argument("files", nargs="+", help="the demo.json of each run (OUT/demo.json)")
    real = sub.add_parser("real", help="real models, prompts split into training and held-out parts")
    real.add_argument("--gen", default=REAL_GEN, help="generator: hub id or local folder (default %(default)s)")
    real.add_argument("--verifier", default=REAL_VERIFIER, help="verifier: hub id or local folder (default %(default)s)")
    real.add_argument("--prompts", default="alpaca_eval",
                      help="'alpaca_eval' (the hub's 805) or a local .jsonl/.json/.txt (default %(default)s)")
    real.add_argument("--out", default="runs/real-demo", help="run folder; a rerun skips finished stages")
    for flag, kind, default, what in (("--held-out", int, 32, "prompts held out for evaluation"),
                                      ("--steps", int, 40, "optimizer steps of each run"),
                                      ("--seed", int, 0, "seed of the split, sampling and the random verifier"),
                                      ("--lr", float, 2e-5, "peak learning rate"),
                                      ("--group-size", int, 4, "G"), ("--prompts-per-step", int, 2, "prompts per step"),
                                      ("--max-new-tokens", int, 96, "response limit, in training and evaluation")):
        real.add_argument(flag, type=kind, default=default, help=f"{what} (default %(default)s)")
    real.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    real.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                      help="rollouts and verifier: bf16 where the hardware has it natively (auto), or forced "
                           "(the update is always fp32; default %(default)s)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["toy", *argv]  # `python demo.py [--seed S]` is the toy world
    args = ap.parse_args(argv)
    try:
        if args.command == "toy":
            if args.steps < 1:
                raise ValueError(f"--steps {args.steps} is too small")
            run_demo(Config(seed=args.seed, out=args.out, max_steps=args.steps))
        elif args.command == "spread":
            missing = [f for f in args.files if not Path(f).is_file()]
            if missing:
                raise ValueError(f"file not found: {missing[0]}")
            print(spread(args.files))
        else:
            for flag in ("held_out", "steps", "group_size", "prompts_per_step", "max_new_tokens"):
                if getattr(args, flag) < (2 if flag == "group_size" else 1):
                    raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is too small")
            if not (args.lr > 0 and np.isfinite(args.lr)):
                raise ValueError(f"--lr {args.lr} must be a positive number")
            run_real(**{k: v for k, v in vars(args).items() if k != "command"})
    except ValueError as e:
        raise SystemExit(f"demo.py: {e}") from None


if __name__ == "__main__":
    main()
