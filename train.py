"""CME-GRPO training: GRPO with the cross-model-entropy reward (Section 2, Appendix A, Appendix E).

    python train.py --gen Qwen/Qwen2.5-0.5B                    # the paper's setting (Appendix E)
    python train.py --gen DIR --verifier DIR --prompts FILE    # local models and prompts
    torchrun --nproc_per_node N train.py ...                   # N processes, one update (distributed.py)

Each optimizer step (`train`, one pass of its loop):
  1. rollout (`generate`): 16 prompts x G = 8 responses sampled from the policy (temperature 1, top-p 1,
     up to 2,048 new tokens; sampling.py);
  2. reward and advantages (`score`): each response scored by the frozen verifier, Eq. 1 per token or
     Eq. 3 per sequence (reward.py), advantages normalised per prompt group, per position for Eq. 1
     (grpo.py);
  3. update (`update`, `policy_update`): one AdamW step on the clipped objective of Eq. 2
     (grpo.grpo_loss), accumulated over micro-batches (and over ranks under torchrun); --num-iterations
     mu > 1 makes it mu steps on the same rollout.
The settings are config.py's, checkpoints and resume runs.py's, the metrics line metrics.py's, and
`python demo.py` runs the whole algorithm on an offline toy world with a ground truth.

Departures from, and readings of, the paper:
  1. One policy update per rollout batch, as Appendix E's 128 completions per update imply: pi_old is
     the policy that sampled, so rho = 1 at the update (old_logp = logp.detach()) and the clip is
     inactive; Eq. 2 is still computed in full (grpo.grpo_loss) and its clip fraction logged.
     `--num-iterations mu` reuses each rollout for mu updates (GRPO's mu), where the clip acts;
     `--loss-type`, `--clip-eps-high` and `--mask-truncated` are the literature's variants of Eq. 2.
  2. Sampling uses exactly the configured values, none of the checkpoint's generation_config, and
     prompts go through the generator's chat template (sampling.py, items 1-3).
  3. `--reward rent` is the self-entropy baseline of Table 2: r_i = -(mean token entropy of the
     generator's own next-token distributions over y_i), with sequence-level advantages.
  4. `--verifier-init random` is Section 4's control: the verifier's architecture with seeded random
     weights (its tokenizer is the real one). `--verifier-init uniform` zeroes that model's output
     layer, so every verifier token costs log V and Eq. 1 rewards only granularity (how many verifier
     tokens a generator token covers): what the random control's signal is worth.
  5. Many processes: each rank takes whole prompt groups and samples from its own stream (seed +
     rank); Eq. 2's 1/G is the whole step's response count and the gradients are summed over ranks
     once per step, so the update is the single-process update on the union of the rollouts
     (distributed.py).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from align import vocab_bytes
from config import RESUME_MAY_CHANGE, Config, check_config, parse_config
from distributed import (Ranks, StopRequest, all_gather, all_gather_tensors, all_sum, barrier, init_ranks, leave,
                         rank_device, sync_gradients)
from grpo import grpo_loss, per_position_advantages, sequence_advantages, token_logprobs
from lora import add_adapters, load_adapters, reference
from metrics import CollapseWatch, log_samples, metrics_line, plot_curves, read_metrics, step_metrics, step_record
from objectives import REWARDS, Batch
from prompts import read_prompts
from reward import Verifier, load_causal_lm
from runs import (check_resume, intact_checkpoint, prompts_sha, prune_checkpoints, read_state, rng_state,
                  save_checkpoint, set_rng_state, truncate_log, weights_digest, writing)
from sampling import (Rollout, autocast, chat_prefix, load_generator, refresh_rollout_model, rendered_lengths,
                      rollout_model, sample)
from trackers import Tracker, open_tracker

# Shape letters: B responses in a step (prompts x G), G group size, T response tokens, L prompt+response.


# --- prompts -----------------------------------------------------------------------------------------

def load_prompts(cfg: Config) -> list[str]:
    """The run's prompts, in training order: deduplicated, a seeded subset, shuffled by the seed."""
    raw = read_prompts(cfg.prompts, cfg.prompt_field, cfg.split)
    prompts = list(dict.fromkeys(p.strip() for p in raw if p and p.strip()))  # dedupe, keep first
    if not prompts:
        raise ValueError(f"no prompts left in {cfg.prompts} after removing empty and duplicate ones")
    rng = random.Random(cfg.seed)
    prompts = rng.sample(prompts, min(cfg.num_prompts, len(prompts)))  # seeded subset, shuffled
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"{len(prompts)} prompts cannot fill one step of --prompts-per-step {cfg.prompts_per_step}")
    return prompts


def fit_context(prompts: list[str], tokenizer, model, cfg: Config, verbose: bool = True) -> list[str]:
    """Drop prompts whose rendered length plus --max-new-tokens exceeds the generator's context (a
    500 KB prompt would otherwise ask for tens of GB), or which are longer than --max-prompt-tokens,
    saying how many (when verbose); refuse a --max-new-tokens that leaves no room for any prompt. Runs
    before the verifier loads."""
    context, lengths = rendered_lengths(model, tokenizer, prompts, cfg.max_new_tokens, cfg.system_prompt)
    limits = ([context - cfg.max_new_tokens] if context else []) + ([cfg.max_prompt_tokens] if cfg.max_prompt_tokens else [])
    if not limits:
        return prompts
    limit = min(limits)
    kept = [p for p, n in zip(prompts, lengths) if n <= limit]
    if len(kept) < len(prompts) and verbose:
        print(f"skipped {len(prompts) - len(kept)} of {len(prompts)} prompts longer than {limit} tokens (the "
              f"generator's context of {context} tokens minus --max-new-tokens {cfg.max_new_tokens}"
              + (f", or --max-prompt-tokens {cfg.max_prompt_tokens})" if cfg.max_prompt_tokens else ")"),
              file=sys.stderr, flush=True)
    if len(kept) < cfg.prompts_per_step:
        raise ValueError(f"{len(kept)} prompts fit the generator's context ({context} tokens with --max-new-tokens "
                         f"{cfg.max_new_tokens}); one step needs --prompts-per-step {cfg.prompts_per_step}")
    return kept


# --- rollouts ----------------------------------------------------------------------------------------

def generate(model, tokenizer, prompts: list[str], cfg: Config, eos_ids: list[int], device, cut_short=None) -> Rollout:
    """G responses to each of the step's prompts, sampled with the run's settings (sampling.sample).
    cut_short: () -> bool, ends the responses early when a stop was asked for."""
    return sample(model, tokenizer, prompts, cfg.group_size, eos_ids, device, temperature=cfg.temperature,
                  top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, system_prompt=cfg.system_prompt,
                  batch_size=cfg.gen_batch, static_cache=cfg.cache == "static", compile_decode=cfg.compile_decode,
                  cut_short=cut_short)


# --- rewards -----------------------------------------------------------------------------------------

def micro_batches(rollout: Rollout, size: int) -> list[list[int]]:
    """Rollout rows in micro-batches of `size`, longest (prompt + response) first: rows of similar length
    share a batch, so little of it is padding. The loss is a per-sequence mean over the whole step
    (Eq. 2, num_sequences fixed before the loop), so the order changes no number but float rounding."""
    lengths = torch.tensor([len(p) for p in rollout.prompt_ids]) + rollout.mask.sum(1)
    order = sorted(range(len(lengths)), key=lambda b: -int(lengths[b]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def policy_logprobs(model, rollout: Rollout, rows, cfg: Config, device, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) on the response tokens of rollout rows: (b, T) float32 (and entropy).

    rows: the rollout rows to score (a list of b indices, or a slice).

    The logits are divided by the sampling temperature (as TRL and verl do), so the update is the
    gradient of the policy that sampled the rollout, and RENT's entropies are that policy's.
    """
    rows = list(range(len(rollout.prompts)))[rows] if isinstance(rows, slice) else list(rows)
    ids = [rollout.prompt_ids[b] + rollout.response[b, :int(rollout.mask[b].sum())].tolist() for b in rows]
    P = torch.tensor([len(rollout.prompt_ids[b]) for b in rows])
    L = max(len(x) for x in ids)
    x = torch.zeros(len(ids), L, dtype=torch.long)
    attn = torch.zeros(len(ids), L, dtype=torch.long)
    target = torch.zeros(len(ids), L, dtype=torch.bool)
    for r, seq in enumerate(ids):  # right padding: no position shift for the real tokens
        x[r, :len(seq)] = torch.tensor(seq)
        attn[r, :len(seq)] = 1
        target[r, int(P[r]):len(seq)] = True                         # the response tokens, EOS included
    T = rollout.response.shape[1]
    where = (P[:, None] + torch.arange(T)).clamp(max=L - 1)          # (b, T) response positions in x;
    mask = rollout.mask[rows]                                        # clamped ones are masked below
    with autocast(device):
        out = token_logprobs(model, x.to(device), attn.to(device), target.to(device),
                             chunk_size=cfg.logprob_chunk, with_entropy=with_entropy,
                             temperature=cfg.temperature)
    if with_entropy:
        return tuple(o.gather(1, where.to(device)) * mask.to(device) for o in out)
    return out.gather(1, where.to(device)) * mask.to(device)           # (b, T)


def score(rollout: Rollout, cfg: Config, verifier, gen_tokenizer, model, device):
    """Rewards and advantages for a rollout: `--reward`'s function (objectives.py), then advantages per
    position (per-token rewards, Eq. 1) or per group (per-response rewards, Eq. 3), after
    grpo.floor_unscored.

    Returns (advantages (B, T) or (B,) float32, per-response reward (B,) float64, cme (B,) float64 or
    None, the verifier's aligned token log-probs (B, T) (Eq. 1's rewards; for samples.jsonl) or None).
    """
    B, T = rollout.response.shape

    def policy(with_entropy: bool = False):  # log pi_old (and entropy) of the rollout, (B, T) on the CPU
        out = torch.zeros(2, B, T)
        with torch.no_grad():
            for rows in micro_batches(rollout, cfg.micro_batch):
                got = policy_logprobs(model, rollout, rows, cfg, device, with_entropy=with_entropy)
                for k, x in enumerate(got if with_entropy else (got,)):
                    out[k, rows] = x.float().cpu()
        return (out[0], out[1]) if with_entropy else out[0]

    batch = Batch(rollout, cfg, verifier, gen_tokenizer, policy)
    got = REWARDS[cfg.reward](batch)
    rewards, valid = batch.floor(got.rewards, got.valid)
    if got.valid is None:                                                           # per response
        return sequence_advantages(rewards, cfg.group_size, cfg.adv_eps), rewards.numpy(), got.cme, got.surprise
    adv = per_position_advantages(rewards, valid, cfg.group_size, cfg.adv_eps)     # per token
    per_response = (rewards.double().sum(1) / valid.sum(1).clamp(min=1)).numpy()
    return adv, per_response, got.cme, got.surprise


# --- the update --------------------------------------------------------------------------------------

def loss_mask(rollout: Rollout, cfg: Config) -> torch.Tensor:
    """(B, T) bool, the tokens Eq. 2 averages over: every response token, less the responses cut at
    --max-new-tokens under --mask-truncated."""
    return rollout.mask & ~rollout.truncated[:, None] if cfg.mask_truncated else rollout.mask


def old_logprobs(model, rollout: Rollout, cfg: Config, device) -> torch.Tensor:
    """log pi_old on the rollout's response tokens, (B, T) float32 on device: the policy before the step's
    first update, computed once so that --num-iterations' later updates see rho != 1."""
    with torch.no_grad():
        old = torch.zeros(rollout.response.shape, device=device)
        for rows in micro_batches(rollout, cfg.micro_batch):
            old[rows] = policy_logprobs(model, rollout, rows, cfg, device)
    return old


def policy_update(model, ref_model, optimizer, scheduler, rollout: Rollout, advantages: torch.Tensor,
                  cfg: Config, device, ranks: Ranks = Ranks(), stop: StopRequest | None = None,
                  old_logp: torch.Tensor | None = None) -> dict | None:
    """One optimizer step of Eq. 2 over the rollout, accumulated over micro-batches (and over ranks:
    `sync_gradients`).

    old_logp: (B, T) log pi_old (`old_logprobs`, computed without dropout); None: the policy being
        updated sampled the rollout, so old_logp = logp.detach() and rho = 1 (the paper's single update
        per rollout). With old_logp, dropout (LoRA's) is off here too: the first update's ratio is 1.
    scheduler: stepped after the update (None: not stepped).
    Returns metrics over the whole step; a non-finite loss or gradient norm skips the step on every
    rank (weights untouched). With `stop`: a requested stop cuts the micro-batches short, and one that
    every rank agrees on before the gradients are summed returns None with the weights untouched.
    """
    model.train()
    if old_logp is not None:  # pi_old was computed without dropout (LoRA's); pi_theta must be the same network
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    B = rollout.response.shape[0]
    num_sequences = B * ranks.world  # Eq. 2's 1/G over the whole step (every rank), fixed before the loop
    mask = loss_mask(rollout, cfg)
    num_tokens = all_sum([mask.sum().item()], ranks, device)[0] if cfg.loss_type == "token" else None
    optimizer.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0, "kl": 0.0}
    tokens = 0.0
    for rows in micro_batches(rollout, cfg.micro_batch):  # longest first: little padding
        if stop is not None and stop.requested:
            break
        logp = policy_logprobs(model, rollout, rows, cfg, device)                 # (b, T) with grad
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad(), reference(model, ref_model):
                ref_logp = policy_logprobs(ref_model, rollout, rows, cfg, device)
        old = logp.detach() if old_logp is None else old_logp[rows]                # rho = 1 / rho
        loss, m = grpo_loss(logp, old, advantages[rows].to(device), mask[rows].to(device), cfg.clip_eps, cfg.beta,
                            ref_logp, num_sequences, cfg.loss_type, cfg.clip_eps_high or None, cfg.max_new_tokens,
                            num_tokens)
        loss.backward()
        n = m["tokens"].item()
        tokens += n
        sums["loss"] += loss.item()
        for k in ("clip_frac", "ratio_mean", "kl"):
            if k in m:
                sums[k] += m[k].item() * n  # token-weighted, so the step's metric is over all its tokens
    if stop is not None and stop.agreed():  # the step is dropped: nothing has touched the weights yet
        optimizer.zero_grad(set_to_none=True)
        return None
    sync_gradients(model, ranks)
    keys = ("loss", "clip_frac", "ratio_mean", "kl")
    *summed, tokens = all_sum([sums[k] for k in keys] + [tokens], ranks, device)
    sums = dict(zip(keys, summed))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()  # equal on all ranks
    skipped = not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm))
    if skipped:  # the whole step is skipped: weights, optimizer state and schedule stay as they were
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    out = {"loss": sums["loss"], "grad_norm": grad_norm, "skipped": skipped,
           "clip_frac": sums["clip_frac"] / max(tokens, 1), "ratio_mean": sums["ratio_mean"] / max(tokens, 1)}
    if ref_model is not None:
        out["kl"] = sums["kl"] / max(tokens, 1)
    return out


def update(model, ref_model, optimizer, scheduler, rollout: Rollout, advantages: torch.Tensor, cfg: Config, device,
           ranks: Ranks = Ranks(), stop: StopRequest | None = None) -> dict | None:
    """The step's --num-iterations updates on one rollout (`policy_update`), all against the policy that
    sampled it (`old_logprobs`); the learning-rate schedule advances once per step. Returns the metrics
    averaged over the updates, or None when a stop came before the first changed the weights (a stop
    later lets the step finish, so a saved step is whole)."""
    if cfg.num_iterations == 1:  # the paper's one update: old_logp = logp.detach(), rho = 1
        return policy_update(model, ref_model, optimizer, scheduler, rollout, advantages, cfg, device, ranks, stop)
    old = old_logprobs(model, rollout, cfg, device)
    runs = []
    for i in range(cfg.num_iterations):
        upd = policy_update(model, ref_model, optimizer, None, rollout, advantages, cfg, device, ranks,
                            stop if i == 0 else None, old)
        if upd is None:
            return None
        runs.append(upd)
    if not all(u["skipped"] for u in runs):
        scheduler.step()
    out = {k: sum(u[k] for u in runs) / len(runs) for k in runs[0] if k != "skipped"}
    return {**out, "skipped": all(u["skipped"] for u in runs), "clip_frac_last": runs[-1]["clip_frac"]}


def lr_schedule(cfg: Config, total_steps: int):
    """Linear warmup over cfg.warmup_steps, then cosine decay to 0 at total_steps (Appendix E)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def checkpoint_activations(model, lora: bool = False) -> None:
    """--gradient-checkpointing: recompute each block's activations in the backward pass instead of keeping
    them (less memory, about one more forward of compute). The same gradients, up to float rounding.
    model: the policy (a transformers model, or peft's wrapper of one); lora: its base weights are frozen."""
    # transformers renamed the switch (gradient_ -> activation_checkpointing_enable) and removes the old name in v6
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False
    if lora:
        model.enable_input_require_grads()  # frozen embeddings: reentrant checkpointing (older transformers) needs a grad


# --- the run -----------------------------------------------------------------------------------------

def resume_point(out: Path, ranks: Ranks) -> tuple[Path, dict]:
    """The checkpoint to resume from and its training state: rank 0 picks the newest intact one and
    every rank reads that one, or the job stops with one line on every rank (ranks that picked on their
    own from a filesystem they see differently would resume different steps, or hang)."""
    path = error = None
    if ranks.main:
        try:
            path = str(intact_checkpoint(out)[0])
        except ValueError as e:
            error = str(e)
    path, error = all_gather((path, error), ranks)[0]
    if error:
        raise ValueError(error)
    try:
        state, problem = read_state(Path(path)), None
    except ValueError as e:
        state, problem = None, f"--resume: rank {ranks.rank} cannot read {path}, which rank 0 chose ({e})"
    problems = [p for p in all_gather(problem, ranks) if p]
    if problems:
        raise ValueError(problems[0])
    return Path(path), state


def train(cfg: Config, on_step=None) -> list[dict]:
    """Run CME-GRPO as configured; return the per-step metrics.

    on_step: optional callable(step, rollout) -> dict of extra metrics for that step's line (the demo
        scores each step's rollouts under a fixed evaluation verifier this way).
    """
    from tqdm import tqdm

    check_config(cfg)
    ranks = init_ranks(cfg.device, cfg.dist_timeout, cfg.prompts_per_step)
    out = Path(cfg.out)
    device = rank_device(cfg.device, ranks)
    prompts = load_prompts(cfg)
    resume_from, state = resume_point(out, ranks) if cfg.resume else (None, None)
    if state is not None:
        check_resume(cfg, state, prompts, RESUME_MAY_CHANGE)
        if state.get("world_size", 1) != ranks.world:
            raise ValueError(f"--resume: the checkpoint was written by {state.get('world_size', 1)} ranks and this "
                             f"run has {ranks.world}; resume with the same number of processes")
    digest = prompts_sha(prompts)

    if cfg.lora_rank:  # frozen weights as they load (bf16 on a GPU), fp32 adapters: the only trained weights
        model, gen_tok, shipped, eos_ids = load_generator(cfg.gen, device, cfg.trust_remote_code, dtype=None)
        if resume_from is not None:
            model = load_adapters(model, resume_from)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the adapters' random init: equal on every rank, in every run
                model = add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    else:
        model, gen_tok, shipped, eos_ids = load_generator(str(resume_from or cfg.gen), device, cfg.trust_remote_code)
    if resume_from is not None and ranks.world > 1:  # a filesystem that nodes see differently shows up here
        loaded = all_gather((state["step"], weights_digest(model)), ranks)
        if len(set(loaded)) > 1:
            odd = next(r for r, x in enumerate(loaded) if x != loaded[0])
            raise ValueError(f"--resume: rank {odd} loaded other weights or another step from {resume_from} than "
                             "rank 0 (a shared filesystem that the nodes see differently?); fix the copies and resume")
    vocab_bytes(gen_tok)  # an unsupported tokenizer (WordPiece) fails here, before any rollout
    prompts = fit_context(prompts, gen_tok, model, cfg, ranks.main)
    steps_per_epoch = len(prompts) // cfg.prompts_per_step
    total_steps = steps_per_epoch * cfg.epochs
    # what the generator sees, so a reader can check it: the first prompt rendered, and the stop tokens
    seen = {"rendered_first_prompt": chat_prefix(gen_tok, prompts[0], cfg.system_prompt),
            "stop_tokens": gen_tok.convert_ids_to_tokens(eos_ids), "prompts_sha256": digest,
            "world_size": ranks.world}
    if ranks.main:
        print(json.dumps({"config": asdict(cfg), **seen}, indent=1, ensure_ascii=False), flush=True)
        with writing(str(out / "config.json"), out):  # a full disk, as every write below: one line
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({**asdict(cfg), **seen}, indent=1, ensure_ascii=False))
    tracker = open_tracker(cfg.report_to, out, {**asdict(cfg), **seen}) if ranks.main else Tracker()

    if cfg.gradient_checkpointing:
        checkpoint_activations(model, lora=bool(cfg.lora_rank))
    ref_model = None
    if cfg.beta > 0 and cfg.lora_rank:  # the reference is the policy with its adapters disabled (lora.reference)
        ref_model = model
    elif cfg.beta > 0:  # beta = 0: no reference model is loaded at all
        # loaded exactly like the policy (fp32, the same autocast), so KL = 0 before the first update
        ref_model = load_generator(cfg.gen, device, cfg.trust_remote_code)[0].requires_grad_(False).eval()
    verifier = None
    if cfg.reward != "rent":
        dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.verifier_dtype]  # auto: bf16 on GPU
        vmodel, vtok = load_causal_lm(cfg.verifier, dtype=dtype, device=device, init=cfg.verifier_init, seed=cfg.seed,
                                      trust_remote_code=cfg.trust_remote_code)  # frozen
        vocab_bytes(vtok)  # likewise for the verifier's tokenizer
        verifier = Verifier(vmodel, vtok, cfg.verifier_token_budget, cfg.logprob_chunk, cfg.mask_whitespace)

    sampler = rollout_model(model, cfg.rollout_dtype)  # the policy itself unless --rollout-dtype bf16
    trained = [p for p in model.parameters() if p.requires_grad]  # every weight, or the LoRA adapters
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total_steps))
    start = 0
    if resume_from is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        set_rng_state(rng[ranks.rank] if isinstance(rng, list) else rng, device)  # older checkpoints: one dict
        start = state["step"]
        if ranks.main:
            for f in ("metrics.jsonl", "samples.jsonl"):  # a kill after the checkpoint logged later steps
                truncate_log(out / f, start)
        if ranks.main:
            print(f"resumed from {resume_from} after step {start}", flush=True)
    else:
        seed = cfg.seed + ranks.rank  # each rank its own sampling stream; rank 0 of 1 is the plain seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if ranks.main:
            for f in ("metrics.jsonl", "samples.jsonl"):
                (out / f).unlink(missing_ok=True)

    def checkpoint(step: int, rng: list) -> Path | None:
        """Rank 0 writes checkpoint-<step> with every rank's RNG state after that step; every rank waits
        for the write, so none leaves (or is killed by torchrun's agent for leaving) while it is made."""
        path = None
        if ranks.main:
            path = save_checkpoint(out, f"checkpoint-{step}", model, gen_tok, shipped, optimizer, scheduler, step,
                                   asdict(cfg), digest, rng)
        barrier(ranks, device)
        return path

    stop = total_steps if cfg.max_steps <= 0 else min(total_steps, cfg.max_steps)
    per_rank = cfg.prompts_per_step // ranks.world
    history = []
    watch = CollapseWatch()  # rank 0's: primed with the steps a resumed run already logged
    if ranks.main and resume_from is not None and (out / "metrics.jsonl").exists():
        for row in read_metrics(out / "metrics.jsonl"):
            watch.update(row)
    bar = tqdm(total=stop, initial=start, desc="cme-grpo", unit="step", dynamic_ncols=True, disable=not ranks.main)
    # A stop (Ctrl-C, SIGTERM) saves the newest complete step: the step in flight is dropped at the next
    # point where the ranks agree (after generation, after scoring, before the gradients are summed, at
    # the step's end), so the checkpoint comes within seconds, not a whole step later (distributed.StopRequest).
    stopper = StopRequest(ranks, device, say=tqdm.write if ranks.main else None)
    rng = all_gather_tensors(rng_state(device), ranks)  # every rank's RNG after the newest complete step
    done, saved = start, start   # the newest complete step, and the newest on disk (0: nothing yet)
    updating = False             # between an optimizer step and the RNG gather that completes it
    with stopper:  # installed until the last checkpoint is written: a signal meanwhile is one more request
        try:
            for step in range(start, stop):
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                k = step % steps_per_epoch
                batch = prompts[k * cfg.prompts_per_step:(k + 1) * cfg.prompts_per_step]
                batch = batch[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]  # whole groups: this rank's share
                rollout = generate(sampler, gen_tok, batch, cfg, eos_ids, device, cut_short=lambda: stopper.requested)
                if stopper.agreed():
                    break
                t1 = time.perf_counter()
                adv, reward, cme, token_rewards = score(rollout, cfg, verifier, gen_tok, model, device)
                if stopper.agreed():
                    break
                t2 = time.perf_counter()
                upd = update(model, ref_model, optimizer, scheduler, rollout, adv, cfg, device, ranks, stopper)
                if upd is None:
                    break
                updating = True
                refresh_rollout_model(sampler, model)
                rng = all_gather_tensors(rng_state(device), ranks)
                done, updating = step + 1, False
                t3 = time.perf_counter()

                record = step_record(rollout, adv, reward, cme, cfg.group_size, (t0, t1, t2, t3), cfg.max_new_tokens)
                m = {"step": done, **step_metrics(all_gather(record, ranks)), **upd, "lr": scheduler.get_last_lr()[0]}
                if device.type == "cuda":
                    m["peak_mem_gb"] = max(all_gather(torch.cuda.max_memory_allocated() / 2 ** 30, ranks))
                if on_step is not None:
                    m.update(on_step(done, rollout))
                history.append(m)
                if ranks.main:
                    log_step(out, m, cfg, rollout, reward, token_rewards, verifier, gen_tok, tracker)
                    if (collapse := watch.update(m)) is not None:
                        tqdm.write(collapse, file=sys.stderr)
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['len_mean']:.0f}",
                                s=f"{m['step_time']:.1f}")
                bar.update(1)
                if stopper.agreed():
                    break
                if done % cfg.save_every == 0 and done < stop:
                    checkpoint(done, rng)
                    saved = done
                    if ranks.main:
                        prune_checkpoints(out, cfg.keep_checkpoints)
        except RuntimeError:  # what a collective raises when a peer is gone (DistBackendError and kin)
            # A rank died under torchrun (the collective that waited for it fails): rank 0 still holds the
            # newest complete step and every rank's RNG after it, so it saves that step on its own.
            if ranks.world > 1 and ranks.main and not updating and done > saved:
                bar.close()
                path = save_checkpoint(out, f"checkpoint-{done}", model, gen_tok, shipped, optimizer, scheduler,
                                       done, asdict(cfg), digest, rng)
                print(f"saved {path}, the newest complete step, before failing", file=sys.stderr)
            raise
        finally:
            bar.close()  # before any error message, which must be the last line
            tracker.close()
        if stopper.stopping:
            path = checkpoint(done, rng) if done > saved else (out / f"checkpoint-{done}" if done else None)
            leave(ranks)
            if ranks.main:
                print(f"interrupted: {f'saved {path}; continue with --resume' if path else 'no step was complete'}",
                      file=sys.stderr)
            raise KeyboardInterrupt
        path = checkpoint(stop, rng)
        leave(ranks)
    if ranks.main:
        prune_checkpoints(out, max(cfg.keep_checkpoints, 1))
        if (out / "metrics.jsonl").exists():
            with writing(str(out / "curves.png"), out):
                plot_curves(out / "metrics.jsonl", out / "curves.png")
        load = (f"a LoRA adapter: python lora.py merge {path} MERGED writes a full model" if cfg.lora_rank else
                "load it with AutoModelForCausalLM.from_pretrained")
        print(f"saved {path} ({load}); curves in {out / 'curves.png'}", flush=True)
    return history


def log_step(out: Path, m: dict, cfg: Config, rollout: Rollout, reward, token_rewards, verifier, gen_tok,
             tracker: Tracker = Tracker()) -> None:
    """Rank 0's records of a step: its metrics line, and every --sample-every steps a few responses with
    their per-token verifier surprise (scored here for Eq. 3 and RENT, whose rewards have no tokens);
    both also go to the tracker (reward: (B,) per-response rewards, for its samples table)."""
    from tqdm import tqdm

    with writing(str(out / "metrics.jsonl"), out), open(out / "metrics.jsonl", "a") as f:
        f.write(metrics_line(m) + "\n")
    tracker.log(m, m["step"])
    if m["skipped"]:
        tqdm.write(f"step {m['step']}: non-finite loss or gradient, step skipped (weights unchanged)")
    if cfg.sample_every and m["step"] % cfg.sample_every == 0:
        tr = token_rewards
        if tr is None and verifier is not None:
            n = min(cfg.num_samples, len(rollout.texts))
            tr, _ = verifier.token_rewards(rollout.prompts[:n], gen_tok,
                                           [rollout.response[b, :int(rollout.mask[b].sum())].numpy() for b in range(n)])
        with writing(str(out / "samples.jsonl"), out):
            samples = log_samples(out / "samples.jsonl", m["step"], rollout, tr, gen_tok, cfg.num_samples)
        for smp in samples:
            tqdm.write(f"[step {m['step']}] {smp['prompt'][:60]!r} -> {smp['response'][:120]!r}")
        tracker.log_samples([{"prompt": s["prompt"], "response": s["response"], "reward": float(reward[b]),
                              "tokens": len(s["tokens"])} for b, s in enumerate(samples)], m["step"])


# --- main --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    cfg = parse_config(argv, __doc__)
    try:
        train(cfg)
    except KeyboardInterrupt:
        return finish(130)
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory; try --micro-batch {max(1, cfg.micro_batch // 2)}, "
              f"--gen-batch {max(1, cfg.gen_batch // 2)} or --gradient-checkpointing", file=sys.stderr)
        return finish(3)
    except (ValueError, OSError) as e:
        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error{where}: {e}", file=sys.stderr)
        return finish(2)
    return finish(0)


def finish(code: int) -> int:
    """The exit code; under torchrun the process ends here, once everything is written and the ranks
    have met: the collective backend's C++ teardown at interpreter exit could otherwise abort a rank
    (SIGABRT, seen with gloo) after a run that succeeded, and torchrun reports the job as failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
