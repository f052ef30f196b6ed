"""This project's trainer beside TRL's GRPOTrainer with the CME reward (trl_cme.py): one experiment, run both ways.

    python compare_trl.py --gen ~/.cache/cme-grpo/real-models/smollm2-135m-instruct \\
        --verifier ~/.cache/cme-grpo/real-models/gemma-3-270m --prompts alpaca_eval --out runs/trl-compare

Each seed trains the generator twice, with `train.py` and with TRL (`SequenceCME` in GRPOTrainer for
--reward sequence, `CMEGRPOTrainer` for --reward token), from the same weights on the same prompts in
the same order (train.py's seeded order, fed to TRL unshuffled), with the same G, prompts per step,
token limit, temperature, learning rate (constant: no warmup; train.py's cosine spans the epoch, so over
a few dozen steps it stays within 1% of the peak), clip, gradient clip, loss (Eq. 2, "grpo") and one
update per rollout batch. Then each trained model, and the generator before training, answers the
held-out prompts greedily, scored as in `demo.py real` (`demo.response_stats`).

What is not the same, by construction: the random numbers (each samples its own rollouts), TRL's
advantages divide by std + 1e-4 where grpo.py zeroes a group whose spread is under 0.02 nats, and TRL
pads prompts on the left in one batch (train.py too, but in its own batches). Every stage is skipped
when its output exists, so a rerun continues. Writes OUT/rewards.csv (training reward per step, each
run) and OUT/report.md (the table).
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from config import Config
from demo import REAL_GEN, REAL_VERIFIER, response_stats, split_prompts
from metrics import read_metrics
from evaluate import run_generate
from records import read_jsonl
from reward import Verifier, load_causal_lm
from sampling import load_generator
from train import fit_context, load_prompts, train


def trl_train(cfg: Config, out: Path) -> list[float]:
    """Train cfg.gen with TRL as `cfg` says (module docstring); the final model in OUT/final.
    Returns the training reward of each step (TRL's "reward": the mean over the step's completions);
    OUT/log.jsonl keeps every number TRL logged at each step."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from trl_cme import CMEGRPOTrainer, SequenceCME

    model, tok, _, _ = load_generator(cfg.gen, torch.device(cfg.device))
    prompts = fit_context(load_prompts(cfg), tok, model, cfg)  # train.py's prompts, in its order
    del model
    verifier = Verifier(*load_causal_lm(cfg.verifier, dtype=torch.float32, device=cfg.device))
    args = trl_config(cfg, out)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    if cfg.reward == "token":
        trainer = CMEGRPOTrainer(cfg.gen, verifier, args=args, processing_class=tok, train_dataset=data)
    else:
        trainer = GRPOTrainer(cfg.gen, SequenceCME(verifier, tok), args=args, processing_class=tok,
                              train_dataset=data)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]  # one line per step
    trainer.save_model(str(out / "final"))
    tok.save_pretrained(str(out / "final"))
    (out / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in logged))
    (out / "rewards.json").write_text(json.dumps([h["reward"] for h in logged]))  # last: the stage is done
    return [h["reward"] for h in logged]


def trl_config(cfg: Config, out):
    """TRL's GRPOConfig for the settings of `cfg` (module docstring)."""
    from trl import GRPOConfig

    return GRPOConfig(output_dir=str(out), use_cpu=cfg.device == "cpu", bf16=False, report_to="none",
                      per_device_train_batch_size=cfg.group_size * cfg.prompts_per_step,
                      num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
                      max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
                      weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, beta=cfg.beta,
                      epsilon=cfg.clip_eps, loss_type="grpo", temperature=cfg.temperature, top_p=cfg.top_p,
                      seed=cfg.seed, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                      shuffle_dataset=False)


def sampling_check(cfg: Config, prompts: list[str], seed: int = 0) -> dict:
    """Step 0, both samplers: G responses to each prompt from the untrained generator with train.py's
    sampler (`sampling.sample`) and with TRL's generation (its GRPOTrainer's generation_config, the
    prompt through the chat template, left-padded), each scored with -CME (Eq. 3). Returns {"train.py",
    "TRL": (mean reward, its standard error over prompts' group means, truncated share)}."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from sampling import sample
    from trl_cme import SequenceCME, completion_texts

    device = torch.device(cfg.device)
    model, tok, _, eos_ids = load_generator(cfg.gen, device)
    verifier = Verifier(*load_causal_lm(cfg.verifier, dtype=torch.float32, device=cfg.device))
    reward = SequenceCME(verifier, tok)
    G, out = cfg.group_size, {}
    torch.manual_seed(seed)
    rollout = sample(model, tok, prompts, G, eos_ids, device, cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                     batch_size=64)
    ours = -verifier.sequence_cme(rollout.prompts, rollout.texts)
    out["train.py"] = (ours, rollout.truncated.numpy())
    trainer = GRPOTrainer(cfg.gen, reward, args=trl_config(cfg, Path(cfg.out) / "trl"),
                          processing_class=AutoTokenizer.from_pretrained(cfg.gen),
                          train_dataset=Dataset.from_list([{"prompt": "x"}]))  # for its generation_config
    rows = [[{"role": "user", "content": p}] for p in prompts for _ in range(G)]
    texts, truncated = [], []
    torch.manual_seed(seed)
    for i in range(0, len(rows), 64):
        rendered = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in rows[i:i + 64]]
        tok.padding_side = "left"
        enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            ids = model.generate(**enc, generation_config=trainer.generation_config)[:, enc.input_ids.shape[1]:]
        for r in ids.tolist():
            hit = next((k for k, t in enumerate(r) if t in trainer.eos_token_ids), None)
            truncated.append(hit is None)
            texts.append(completion_texts(tok, [r[:hit + 1] if hit is not None else r])[0])
    theirs = -verifier.sequence_cme([p for p in prompts for _ in range(G)], texts)
    out["TRL"] = (theirs, np.array(truncated))
    result = {}
    for name, (r, cut) in out.items():
        groups = np.nanmean(r.reshape(-1, G), 1)
        result[name] = (float(np.nanmean(r)), float(groups.std(ddof=1) / np.sqrt(len(groups))), float(cut.mean()))
    return result


def run(gen: str, verifier: str, prompts: str, out: str, seeds: list[int], steps: int, reward: str,
        group_size: int, prompts_per_step: int, max_new_tokens: int, lr: float, held_out: int,
        device: str = "cpu") -> dict:
    """Both trainers for each seed, then the held-out measures. Returns {"rewards": {run: [per step]},
    "held_out": {run: response_stats}} and writes OUT/rewards.csv and OUT/report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, held = split_prompts(prompts, held_out, seed=0)  # one split for every run
    held_file, train_file = out / "held_out.jsonl", out / "train_prompts.jsonl"
    held_file.write_text("".join(json.dumps({"index": i, "instruction": p}) + "\n" for i, p in enumerate(held)))
    train_file.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in train_prompts))
    base = replace(Config(), gen=gen, verifier=verifier, prompts=str(train_file), reward=reward,
                   group_size=group_size, prompts_per_step=prompts_per_step, micro_batch=group_size * prompts_per_step,
                   gen_batch=group_size * prompts_per_step, max_new_tokens=max_new_tokens, lr=lr, warmup_steps=0,
                   max_steps=steps, save_every=steps, sample_every=0, device=device, verifier_dtype="fp32",
                   rollout_dtype="fp32")
    rewards, se, models = {}, {}, {"before": gen}  # se: the standard error of each step's mean reward
    B = group_size * prompts_per_step
    for seed in seeds:
        cfg = replace(base, seed=seed)
        name, run_out = f"train.py seed {seed}", out / f"train-seed{seed}"
        if not (run_out / f"checkpoint-{steps}").is_dir():
            print(f"\n{name}: {steps} steps", flush=True)
            train(replace(cfg, out=str(run_out), resume=any(run_out.glob("checkpoint-*"))))
        logged = read_metrics(run_out / "metrics.jsonl")
        rewards[name] = [m["reward_mean"] for m in logged]
        se[name] = [m["reward_std"] / np.sqrt(B - 1) for m in logged]  # population std over the step's B
        models[name] = str(run_out / f"checkpoint-{steps}")
        name, run_out = f"TRL seed {seed}", out / f"trl-seed{seed}"
        if not (run_out / "rewards.json").is_file():
            print(f"\n{name}: {steps} steps", flush=True)
            trl_train(cfg, run_out)
        rewards[name] = json.loads((run_out / "rewards.json").read_text())
        se[name] = [json.loads(x)["reward_std"] / np.sqrt(B) for x in (run_out / "log.jsonl").read_text().splitlines()]
        models[name] = str(run_out / "final")

    judge = Verifier(*load_causal_lm(verifier, dtype=torch.float32, device=device))
    stats = {}
    for i, (name, model) in enumerate(models.items()):
        path = out / f"outputs-{i}.jsonl"
        run_generate(model, path, prompts_source=str(held_file), max_new_tokens=max_new_tokens, batch_size=8,
                     name=name, device=device)
        rows = sorted(read_jsonl(path), key=lambda r: r["index"])
        stats[name] = response_stats([r["instruction"] for r in rows], [r["output"] for r in rows],
                                     [r["truncated"] for r in rows], judge)
    with open(out / "rewards.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *rewards])
        for step in range(steps):
            w.writerow([step + 1, *(f"{r[step]:.4f}" if step < len(r) else "" for r in rewards.values())])
    report = table(rewards, stats, reward, len(held)) + "\n\n" + differences(rewards, se, seeds)
    (out / "report.md").write_text(report + "\n")
    print(report)
    return {"rewards": rewards, "held_out": stats, "se": se}


def table(rewards: dict, stats: dict, reward: str, n: int) -> str:
    """The side-by-side table (markdown): training reward over the first and last 5 steps and its
    per-step slope (least squares), then the held-out measures of `demo.response_stats`."""
    what = "Eq. 3, -CME per response" if reward == "sequence" else "Eq. 1, mean aligned token reward per response"
    lines = [f"Training reward ({what}; mean over each step's completions), and greedy outputs on {n} held-out "
             "prompts: CME under the verifier (nats/token), words, distinct-n, compression, truncated.", "",
             "| run | reward, steps 1-5 | reward, last 5 | slope /step | held-out CME | words | distinct-1 | "
             "distinct-2 | compression | truncated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        r = rewards.get(name)
        head = (f"{np.mean(r[:5]):.3f} | {np.mean(r[-5:]):.3f} | {np.polyfit(np.arange(len(r)), r, 1)[0]:+.4f}"
                if r else "- | - | -")
        lines.append(f"| {name} | {head} | {s['cme']:.3f} | {s['words']:.1f} | {s['distinct_1']:.3f} | "
                     f"{s['distinct_2']:.3f} | {s['compression']:.3f} | {s['truncated']:.0%} |")
    return "\n".join(lines)


def differences(rewards: dict, se: dict, seeds: list[int]) -> str:
    """How far TRL's training reward is from train.py's at each step of the same seed (same prompts,
    other samples), beside what sampling alone gives: sqrt(se_a^2 + se_b^2), the standard error of the
    difference of two independent step means. A ratio near 1 means sampling explains the gap."""
    lines = ["| seed | mean difference TRL - train.py | RMS difference | RMS expected from sampling | ratio |",
             "|---|---|---|---|---|"]
    for seed in seeds:
        a, b = f"train.py seed {seed}", f"TRL seed {seed}"
        n = min(len(rewards[a]), len(rewards[b]))
        diff = np.array(rewards[b][:n]) - np.array(rewards[a][:n])
        rms = float(np.sqrt(np.mean(diff ** 2)))
        expected = float(np.sqrt(np.mean(np.array(se[a][:n]) ** 2 + np.array(se[b][:n]) ** 2)))
        lines.append(f"| {seed} | {diff.mean():+.3f} | {rms:.3f} | {expected:.3f} | {rms / expected:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gen", default=REAL_GEN, help="generator: hub id or local folder (default %(default)s)")
    ap.add_argument("--verifier", default=REAL_VERIFIER, help="verifier: hub id or local folder (default %(default)s)")
    ap.add_argument("--prompts", default="alpaca_eval", help="alpaca_eval, or a .jsonl/.json/.txt file")
    ap.add_argument("--out", default="runs/trl-compare", help="run folder; a rerun skips finished stages")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, each run both ways (default 0 1)")
    ap.add_argument("--reward", default="sequence", choices=["sequence", "token"],
                    help="Eq. 3 (SequenceCME in GRPOTrainer) or Eq. 1 (CMEGRPOTrainer) (default %(default)s)")
    for flag, kind, default, what in (("--steps", int, 25, "optimizer steps"), ("--group-size", int, 4, "G"),
                                      ("--prompts-per-step", int, 2, "prompts per step"),
                                      ("--max-new-tokens", int, 64, "response token limit"),
                                      ("--lr", float, 2e-5, "learning rate, constant"),
                                      ("--held-out", int, 32, "held-out prompts")):
        ap.add_argument(flag, type=kind, default=default, help=f"{what} (default %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    ap.add_argument("--sampling-check", type=int, default=0, metavar="N",
                    help="instead of training: the untrained generator sampled by both, G responses to each of N "
                         "held-out prompts, rewards side by side")
    a = ap.parse_args(argv)
    for flag in ("steps", "group_size", "prompts_per_step", "max_new_tokens", "held_out"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if a.group_size < 2:
        ap.error("--group-size must be at least 2: GRPO compares the G responses of a prompt")
    if not 0 < a.lr < float("inf"):
        ap.error(f"--lr {a.lr}: must be a positive number")
    if a.sampling_check < 0:
        ap.error("--sampling-check must be 0 (off) or a number of prompts")
    if a.prompts != "alpaca_eval" and not Path(a.prompts).is_file():
        ap.error(f"--prompts {a.prompts}: file not found")
    if a.sampling_check:
        _, held = split_prompts(a.prompts, a.sampling_check, seed=0)  # the first N of run's held-out prompts
        cfg = replace(Config(), gen=a.gen, verifier=a.verifier, group_size=a.group_size,
                      max_new_tokens=a.max_new_tokens, device=a.device, out=a.out)
        for name, (mean, se, cut) in sampling_check(cfg, held, a.seeds[0]).items():
            print(f"{name:9s} reward {mean:.3f} +- {se:.3f} (standard error over {len(held)} prompts), "
                  f"truncated {cut:.0%}")
        return
    run(a.gen, a.verifier, a.prompts, a.out, a.seeds, a.steps, a.reward, a.group_size, a.prompts_per_step,
        a.max_new_tokens, a.lr, a.held_out, a.device)


if __name__ == "__main__":
    main()
