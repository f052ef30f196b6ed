"""CME-GRPO training: GRPO with the cross-model-entropy reward (Section 2, Appendix A, Appendix E).

    python train.py --gen Qwen/Qwen2.5-0.5B                    # the paper's setting (Appendix E)
    python train.py --gen DIR --verifier DIR --prompts FILE    # local models and prompts
    python train.py --demo                                     # offline toy world and its ground truth, ~75 s on a CPU

Each optimizer step: 16 prompts x G = 8 sampled responses (temperature 1, top-p 1, up to 2,048 new
tokens); each response scored by the frozen verifier (Eq. 1 per token, or Eq. 3 per sequence);
advantages normalised per prompt group (per position for Eq. 1); one AdamW step on the clipped
objective of Eq. 2, accumulated over micro-batches.

Departures from, and readings of, the paper:
  1. One policy update per rollout batch, as Appendix E's 128 completions per update imply: pi_old is
     the policy that sampled, so rho = 1 at the update (old_logp = logp.detach()) and the clip is
     inactive; Eq. 2 is still computed in full (grpo.grpo_loss) and its clip fraction logged.
  2. Sampling uses exactly the configured values: the checkpoint's own generation_config (Qwen2.5
     Instruct ships temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05) is set aside at
     load and restored in the saved checkpoints, and top-k is disabled.
  3. Prompts go through the generator's chat template (add_generation_prompt); a base model with no
     template gets `bos_token + reward.PLAIN_TEMPLATE`, the format the verifier uses for such models.
  4. `--reward rent` is the self-entropy baseline of Table 2: r_i = -(mean token entropy of the
     generator's own next-token distributions over y_i), with sequence-level advantages.
  5. `--verifier-init random` is Section 4's control: the verifier's architecture with seeded random
     weights (its tokenizer is the real one). `--verifier-init uniform` zeroes that model's output
     layer, so every verifier token costs log V and Eq. 1 rewards only granularity (how many verifier
     tokens a generator token covers): what the random control's signal is worth.
  6. Many processes (`torchrun --nproc_per_node N train.py ...`): each rank takes whole prompt groups
     (the step's prompts split in N), so per-position advantages need no communication; it samples
     from its own stream (seed + rank) and holds a replica of the frozen verifier. Eq. 2's 1/G is the
     whole step's response count, and the gradients are summed over ranks once per optimizer step
     (one all-reduce each, `sync_gradients`), so the update is the single-process update on the union
     of the rollouts. (DistributedDataParallel would never synchronise here: token_logprobs calls the
     decoder and output layer directly, not the model's forward.) `python train.py` is one rank.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from align import decode_response, token_bytes, vocab_bytes
from grpo import SIGMA_FLOOR, grpo_loss, per_position_advantages, sequence_advantages, token_logprobs
from reward import PLAIN_TEMPLATE, Verifier, check_device, load_causal_lm, turn_end

# Shape letters: B responses in a step (prompts x G), G group size, T response tokens, L prompt+response.


# --- config ------------------------------------------------------------------------------------------

def _f(default, help: str, **kw):
    """A Config field: its default, its help text, and optionally `choices` or a range rule `check`
    (">0", ">=1", "(0,1)", "(0,1]") that check_config enforces."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Every hyperparameter of a run; defaults from Appendix E of the paper."""
    gen: str = _f("Qwen/Qwen2.5-0.5B", "generator to train: hub id or local folder")
    verifier: str = _f("google/gemma-3-1b-it", "frozen verifier: hub id or local folder (Section 3 uses "
                       "google/gemma-3n-E4B-it)")
    verifier_init: str = _f("pretrained", "verifier weights: pretrained | random (Section 4 control) | "
                            "uniform (every token costs log V: a pure-granularity control)",
                            choices=["pretrained", "random", "uniform"])
    reward: str = _f("token", "token (Eq. 1) | sequence (Eq. 3) | rent (self-entropy baseline, Table 2)",
                     choices=["token", "sequence", "rent"])
    mask_whitespace: bool = _f(True, "mask whitespace-only generator tokens (Appendix B)")
    eos_reward: bool = _f(False, "reward the EOS position with the verifier's log-prob of its own end-of-turn "
                          "token (the paper gives EOS none: it has no text); truncated responses get none")
    adv_eps: float = _f(SIGMA_FLOOR, "sigma floor of the advantages: a position (or group) whose reward spread is "
                        "at most this many nats gets advantage 0 (the measured bf16 noise floor, grpo.SIGMA_FLOOR)", check=">=0")
    system_prompt: str | None = _f(None, "system prompt for the generator's chat template: text, or \"\" for "
                                   "none (default: the template's own, e.g. Qwen2.5's 'You are Qwen...')")
    prompts: str = _f("openbmb/UltraFeedback", "hub dataset id or dataset folder, or a local .jsonl / .json / "
                      ".txt file")
    prompt_field: str = _f("instruction", "field holding the prompt in dataset rows and JSON objects")
    split: str = _f("train", "dataset split (hub datasets only)")
    num_prompts: int = _f(5000, "seeded subset of the deduplicated prompts", check=">=1")
    seed: int = _f(0, "seed for the prompt subset and order, sampling and the random verifier", check=">=0")
    group_size: int = _f(8, "G: responses sampled per prompt", check=">=2")
    prompts_per_step: int = _f(16, "prompts per optimizer step (x G responses, accumulated)", check=">=1")
    micro_batch: int = _f(4, "responses per forward/backward micro-batch", check=">=1")
    gen_batch: int = _f(128, "responses generated per generate() call", check=">=1")
    cache: str = _f("dynamic", "KV cache of rollout generation: dynamic | static (preallocated; what torch.compile "
                    "and CUDA graphs need; off until measured on a GPU, README)", choices=["dynamic", "static"])
    compile_decode: bool = _f(False, "with --cache static on a GPU, let transformers compile the decode step "
                              "(torch.compile, CUDA graphs); off until measured")
    rollout_dtype: str = _f("fp32", "weights rollouts are sampled with: fp32 (the policy itself, bf16 autocast on "
                            "GPU) | bf16 (a bf16 copy refreshed after every update: faster decode, +2 bytes per "
                            "parameter; off until measured)", choices=["fp32", "bf16"])
    verifier_dtype: str = _f("auto", "verifier weights: auto (bf16 on a GPU, as Appendix E; fp32 on a CPU) | bf16 "
                             "(also on a CPU: 2.5x faster scoring on one with native bf16) | fp32",
                             choices=["auto", "bf16", "fp32"])
    temperature: float = _f(1.0, "sampling temperature", check=">0")
    top_p: float = _f(1.0, "nucleus sampling p", check="(0,1]")
    max_new_tokens: int = _f(2048, "maximum response length in generator tokens", check=">=1")
    max_prompt_tokens: int = _f(0, "skip prompts longer than this many generator tokens, chat template included, "
                                "with a count in the log (0: only the context limit; the authors' code uses 512)",
                                check=">=0")
    lr: float = _f(3e-6, "AdamW peak learning rate (Appendix E: 3e-6 Qwen, 5e-6 Llama)", check=">0")
    weight_decay: float = _f(0.0, "AdamW weight decay", check=">=0")
    warmup_steps: int = _f(20, "linear warmup steps, then cosine decay to 0 over the epoch", check=">=0")
    grad_clip: float = _f(1.0, "gradient-norm clip", check=">0")
    clip_eps: float = _f(0.2, "PPO clip epsilon of Eq. 2", check="(0,1)")
    beta: float = _f(0.0, "KL coefficient of Eq. 2; 0 loads no reference model", check=">=0")
    epochs: int = _f(1, "passes over the prompts", check=">=1")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: all); the schedule still spans the epochs", check=">=0")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: less memory, more compute")
    verifier_token_budget: int = _f(16384, "padded tokens per verifier micro-batch", check=">=1")
    logprob_chunk: int = _f(1024, "positions per output-layer chunk (float32 logits of this many exist)", check=">=1")
    out: str = _f("runs/cme-grpo", "output folder: metrics, samples, checkpoints, curves")
    save_every: int = _f(50, "checkpoint every N steps (and at the end)", check=">=1")
    keep_checkpoints: int = _f(2, "intermediate checkpoints kept on disk", check=">=0")
    sample_every: int = _f(10, "log samples with per-token verifier surprise every N steps", check=">=0")
    num_samples: int = _f(2, "samples logged each time", check=">=0")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    trust_remote_code: bool = _f(False, "allow model repos to run their own code")
    device: str = _f("auto", "auto | cpu | cuda")
    dist_timeout: int = _f(600, "torchrun: seconds a rank waits for the others in a collective before failing",
                           check=">=1")
    demo: bool = _f(False, "run the offline toy demo instead (see `demo`)")


def parse_config(argv=None) -> Config:
    """Turn Config into a CLI: --field-name VALUE, booleans as --flag / --no-flag."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        name = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.type in ("bool", bool):
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            kind = {"int": int, "float": float, "str": str, "str | None": str}[
                f.type if isinstance(f.type, str) else f.type.__name__]
            rule = f"; {meta['check']}" if "check" in meta else ""
            default = "" if "default:" in meta["help"] else f" (default: {f.default}{rule})"
            ap.add_argument(name, type=kind, default=f.default, choices=meta.get("choices"),
                            help=meta["help"] + default)
    return Config(**vars(ap.parse_args(argv)))


def _allowed(value: float, rule: str) -> bool:
    """Whether value satisfies a range rule of a Config field: ">0", ">=1", "(0,1)", "(0,1]"."""
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    lo, hi = map(float, rule[1:-1].split(","))
    return (lo < value if rule[0] == "(" else lo <= value) and (value < hi if rule[-1] == ")" else value <= hi)


def check_config(cfg: Config) -> None:
    """Reject bad settings before any work, with one line naming the flag: every number against the
    range its field declares (NaN and infinity included: --grad-clip nan would write NaN weights,
    --grad-clip -1 trains backwards), and the device."""
    for f in fields(Config):
        rule, value, flag = f.metadata.get("check"), getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if rule is None:
            continue
        if not math.isfinite(value):
            raise ValueError(f"{flag} {value}: must be a finite number")
        if not _allowed(value, rule):
            if f.name == "group_size":
                raise ValueError(f"{flag} {value}: GRPO needs at least 2 responses per prompt")
            raise ValueError(f"{flag} {value}: must be {rule.replace('>=', 'at least ').replace('>', 'above ')}"
                             if rule[0] == ">" else f"{flag} {value}: must lie in {rule.replace(',', ', ')}")
    _device(cfg)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is a file; name a folder for the run")


# --- prompts -----------------------------------------------------------------------------------------

def _read_prompt_file(path: Path, key: str) -> list[str]:
    def pick(obj, where):
        if isinstance(obj, str):
            return obj
        if isinstance(obj, dict) and isinstance(obj.get(key), str):
            return obj[key]
        raise ValueError(f"{where}: expected a string or an object with a string {key!r} field")

    if path.suffix not in (".txt", ".jsonl", ".json"):
        raise ValueError(f"{path}: prompt files must end in .jsonl, .json or .txt")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?)") from None
    if path.suffix == ".txt":
        return text.splitlines()
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(pick(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return out
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts")
    return [pick(x, f"{path}: item {i}") for i, x in enumerate(data)]


def load_prompts(cfg: Config) -> list[str]:
    """The run's prompts, in training order: deduplicated, a seeded subset, shuffled by the seed."""
    path = Path(cfg.prompts)
    if not path.is_dir() and (path.suffix in (".jsonl", ".json", ".txt") or path.exists()):
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        raw = _read_prompt_file(path, cfg.prompt_field)
    else:
        import datasets
        try:
            raw = datasets.load_dataset(cfg.prompts, split=cfg.split)[cfg.prompt_field]
        except Exception as e:  # noqa: BLE001  (hub and dataset errors come in many types)
            raise ValueError(f"cannot load prompts from dataset {cfg.prompts!r} split {cfg.split!r}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    prompts = list(dict.fromkeys(p.strip() for p in raw if p and p.strip()))  # dedupe, keep first
    if not prompts:
        raise ValueError(f"no prompts left in {cfg.prompts} after removing empty and duplicate ones")
    rng = random.Random(cfg.seed)
    prompts = rng.sample(prompts, min(cfg.num_prompts, len(prompts)))  # seeded subset, shuffled
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"{len(prompts)} prompts cannot fill one step of --prompts-per-step {cfg.prompts_per_step}")
    return prompts


def rendered_lengths(model, tokenizer, prompts: list[str], max_new_tokens: int, system_prompt: str | None,
                     who: str = "generator") -> tuple[int | None, list[int]]:
    """(the model's context in tokens, or None if its config names none; each prompt's length in tokens
    after the chat template). Refuses a max_new_tokens that leaves no room for any prompt."""
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    context = getattr(text_cfg, "max_position_embeddings", None)
    if context is not None and max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the {who}'s context is {context} tokens, "
                         "prompt included")
    rendered = [chat_prefix(tokenizer, p, system_prompt) for p in prompts]
    return context, [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(rendered, add_special_tokens=False)]


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

def chat_prefix(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The generator's input text for a prompt: its chat template, or the plain format.

    system_prompt: None keeps the template's behaviour (Qwen2.5 and SmolLM2 inject a default system
    prompt, as TRL does); text becomes a system turn; "" means no system text: it removes a default the
    template injects (an empty system turn is the only way these templates allow) and otherwise adds
    nothing. A model without a chat template has no system turn; text is then put before the prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        head = f"{system_prompt}\n\n" if system_prompt else ""
        return (tokenizer.bos_token or "") + PLAIN_TEMPLATE.format(prompt=head + prompt)

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    user = [{"role": "user", "content": prompt}]
    if system_prompt is None:
        return render(user)
    if system_prompt:
        return render([{"role": "system", "content": system_prompt}] + user)
    plain, marked = render(user), render([{"role": "system", "content": _SYSTEM_MARK}] + user)
    before, _, after = marked.partition(_SYSTEM_MARK)
    injects_default = (len(plain) > len(before) + len(after) and plain.startswith(before)
                       and plain.endswith(after))
    return before + after if injects_default else plain


_SYSTEM_MARK = "<<CME-GRPO-SYSTEM-7f3a>>"


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """Ids that end a response: the union of the generation config's EOS, the tokenizer's EOS and the
    chat template's end-of-turn token. Qwen2.5 *base* ships EOS <|endoftext|> while its template ends
    a turn with <|im_end|>: stopping on EOS alone lets a base model run on into invented turns.
    """
    eos = generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    end = turn_end(tokenizer)  # without a template, the tokenizer's EOS: already in the list
    for extra in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end) if end else None):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def sampling_config(cfg: Config, eos_ids: list[int], pad_id: int):
    """A GenerationConfig with every sampling knob set to the run's value (nothing from the checkpoint).

    --cache static preallocates the KV cache (prompt + max_new_tokens) instead of growing it every
    step; on a GPU transformers then compiles the decode step unless told not to, which only
    --compile-decode allows. Greedy outputs equal the dynamic cache's (tested on CPU)."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                            min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                            cache_implementation="static" if cfg.cache == "static" else None,
                            disable_compile=not cfg.compile_decode)


@dataclass
class Rollout:
    """G responses to each of the step's prompts.

    prompts: B strings (each prompt repeated G times, groups contiguous).
    prompt_ids: B lists of generator ids of the prompt prefix.
    response: (B, T) int64 sampled ids, padded. mask: (B, T) bool, tokens up to and including EOS.
    truncated: (B,) bool, no EOS within max_new_tokens. texts: B response texts (what the verifier reads).
    """
    prompts: list
    prompt_ids: list
    response: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    texts: list


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: Config, eos_ids: list[int], device) -> Rollout:
    """Sample G responses to each prompt, cfg.gen_batch rows per generate() call, left-padded."""
    rows = [p for p in prompts for _ in range(cfg.group_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    gen_cfg = sampling_config(cfg, eos_ids, pad)
    prompt_ids = [tokenizer(chat_prefix(tokenizer, p, cfg.system_prompt), add_special_tokens=False).input_ids
                  for p in rows]
    responses = []
    model.eval()
    for i in range(0, len(rows), cfg.gen_batch):
        x, attn = left_pad(prompt_ids[i:i + cfg.gen_batch], pad, device)
        with _autocast(device):
            out = model.generate(input_ids=x, attention_mask=attn, generation_config=gen_cfg)
        responses.extend(out[:, x.shape[1]:].cpu())
    T = max(r.shape[0] for r in responses)
    response = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    truncated = torch.zeros(len(rows), dtype=torch.bool)
    eos = torch.tensor(eos_ids)
    for b, r in enumerate(responses):
        hits = torch.isin(r, eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else r.shape[0]  # keep the EOS: the policy learns to stop
        truncated[b] = not len(hits)
        response[b, :n] = r[:n]
        mask[b, :n] = True
    texts = [decode_response(token_bytes(tokenizer, response[b, :int(mask[b].sum())].numpy())).text
             for b in range(len(rows))]
    return Rollout(rows, prompt_ids, response, mask, truncated, texts)


def rollout_model(model, cfg: Config):
    """The model rollouts are sampled from: the policy itself, or with --rollout-dtype bf16 a frozen bf16
    copy (no per-step weight casts under autocast), which `refresh_rollout_model` keeps equal to the
    policy's weights rounded to bf16. It samples from that rounding of the policy; the update treats the
    rollouts as on-policy (rho = 1), the mismatch every trainer with a separate inference engine accepts."""
    if cfg.rollout_dtype == "fp32":
        return model
    import copy
    return copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)


@torch.no_grad()
def refresh_rollout_model(rollout_copy, model) -> None:
    """Copy the policy's weights into its rollout copy (a no-op when they are the same model)."""
    if rollout_copy is not model:
        for a, b in zip(rollout_copy.parameters(), model.parameters()):
            a.copy_(b)


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows left-padded to one length, for generate(): (ids (b, P) int64, attention mask (b, P))."""
    P = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=device)
    attn = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, attn


def _autocast(device):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


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
    with _autocast(device):
        out = token_logprobs(model, x.to(device), attn.to(device), target.to(device),
                             chunk_size=cfg.logprob_chunk, with_entropy=with_entropy,
                             temperature=cfg.temperature)
    if with_entropy:
        return tuple(o.gather(1, where.to(device)) * mask.to(device) for o in out)
    return out.gather(1, where.to(device)) * mask.to(device)           # (b, T)


def score(rollout: Rollout, cfg: Config, verifier, gen_tokenizer, model, device):
    """Rewards and advantages for a rollout (Eq. 1 / Eq. 3 / RENT).

    Returns (advantages (B, T) or (B,) float32, per-response reward (B,) float64, cme (B,) float64 or
    None, token rewards (B, T) or None).
    """
    B = rollout.response.shape[0]
    ended = (~rollout.truncated).tolist() if cfg.eos_reward else None
    if cfg.reward == "token":
        ids = [rollout.response[b, :int(rollout.mask[b].sum())].numpy() for b in range(B)]
        narrow, narrow_valid = verifier.token_rewards(rollout.prompts, gen_tokenizer, ids, ended=ended)  # Eq. 1
        T = rollout.response.shape[1]  # token_rewards is as wide as the longest response; pad to T
        rewards, valid = torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool)
        rewards[:, :narrow.shape[1]], valid[:, :narrow.shape[1]] = narrow, narrow_valid
        adv = per_position_advantages(rewards, valid, cfg.group_size, cfg.adv_eps)
        n = valid.sum(1).clamp(min=1)
        per_response = (rewards.double().sum(1) / n).numpy()
        per_response[valid.sum(1).numpy() == 0] = np.nan
        return adv, per_response, -per_response, rewards
    if cfg.reward == "sequence":
        cme = verifier.sequence_cme(rollout.prompts, rollout.texts, ended=ended)       # Eq. 3
        r = torch.from_numpy(-cme)
        return sequence_advantages(r, cfg.group_size, cfg.adv_eps), -cme, cme, None
    r = torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        for rows in micro_batches(rollout, cfg.micro_batch):
            _, ent = policy_logprobs(model, rollout, rows, cfg, device, with_entropy=True)
            m = rollout.mask[rows].to(device)
            r[rows] = -(ent.sum(1) / m.sum(1).clamp(min=1)).double().cpu()               # RENT
    return sequence_advantages(r, cfg.group_size, cfg.adv_eps), r.numpy(), None, None


# --- many processes: torchrun ----------------------------------------------------------------------

@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; plain `python train.py` is rank 0 of 1."""
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_ranks(cfg: Config) -> Ranks:
    """Join the torchrun job named by the environment (RANK, WORLD_SIZE, LOCAL_RANK), NCCL on GPUs and
    gloo on CPU; a rank that waits longer than --dist-timeout for the others fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} cannot be split over {world} ranks; "
                         "use a multiple of the number of processes")
    import torch.distributed as dist
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = _device(cfg, ranks).type == "cuda"
    if cuda:
        torch.cuda.set_device(ranks.local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.dist_timeout))
    return ranks


def all_sum(values: list[float], ranks: Ranks, device) -> list[float]:
    """Each value summed over ranks (float64); the values themselves with one rank."""
    if ranks.world == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj, ranks: Ranks) -> list:
    """[the object of rank 0, rank 1, ...] (picklable objects); [obj] with one rank."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def gather_rng_states(ranks: Ranks) -> list[dict]:
    """Every rank's RNG state, rank 0 first. (Gathered as torch.save bytes: all_gather_object cannot
    carry the tensors inside an RNG state.)"""
    import io
    buf = io.BytesIO()
    torch.save(_rng_state(), buf)
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in all_gather(buf.getvalue(), ranks)]


def sync_gradients(model, ranks: Ranks) -> None:
    """Sum the gradients over ranks: one all-reduce per parameter, once per optimizer step. Each rank's
    loss is already its share of the global Eq. 2 (num_sequences counts every rank's responses), so the
    sum is the single-process gradient of the whole step. A parameter without a gradient takes part
    with zeros, so every rank issues the same collectives."""
    if ranks.world == 1:
        return
    import torch.distributed as dist
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


# --- the update --------------------------------------------------------------------------------------

def policy_update(model, ref_model, optimizer, scheduler, rollout: Rollout, advantages: torch.Tensor,
                  cfg: Config, device, ranks: Ranks = Ranks()) -> dict:
    """One optimizer step of Eq. 2 over the rollout, accumulated over micro-batches (and over ranks:
    `sync_gradients`).

    Returns metrics over the whole step; a non-finite loss or gradient norm skips the step on every
    rank (weights untouched).
    """
    model.train()
    B = rollout.response.shape[0]
    num_sequences = B * ranks.world  # Eq. 2's 1/G over the whole step (every rank), fixed before the loop
    optimizer.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0, "kl": 0.0}
    tokens = 0.0
    for rows in micro_batches(rollout, cfg.micro_batch):  # longest first: little padding
        logp = policy_logprobs(model, rollout, rows, cfg, device)                 # (b, T) with grad
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = policy_logprobs(ref_model, rollout, rows, cfg, device)
        loss, m = grpo_loss(logp, logp.detach(), advantages[rows].to(device), rollout.mask[rows].to(device),
                            cfg.clip_eps, cfg.beta, ref_logp, num_sequences=num_sequences)  # rho = 1
        loss.backward()
        n = m["tokens"].item()
        tokens += n
        sums["loss"] += loss.item()
        for k in ("clip_frac", "ratio_mean", "kl"):
            if k in m:
                sums[k] += m[k].item() * n  # token-weighted, so the step's metric is over all its tokens
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
        scheduler.step()
    out = {"loss": sums["loss"], "grad_norm": grad_norm, "skipped": skipped,
           "clip_frac": sums["clip_frac"] / max(tokens, 1), "ratio_mean": sums["ratio_mean"] / max(tokens, 1)}
    if ref_model is not None:
        out["kl"] = sums["kl"] / max(tokens, 1)
    return out


def lr_schedule(cfg: Config, total_steps: int):
    """Linear warmup over cfg.warmup_steps, then cosine decay to 0 at total_steps (Appendix E)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# --- checkpoints -------------------------------------------------------------------------------------

def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()),
                                                  *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, name: str, model, tokenizer, generation_config, optimizer, scheduler,
                    step: int, cfg: Config, prompts_digest: str | None = None, rng: list | None = None) -> Path:
    """Write a checkpoint to a temporary folder and rename it: a crash never leaves half a checkpoint.

    A failed write (a full disk) removes the temporary folder and raises OSError in one line; the
    checkpoints already on disk are untouched. prompts_digest: `prompts_sha` of the run's prompts.
    rng: every rank's RNG state, rank 0 first (default: this process's alone).
    """
    final, tmp = out / name, out / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model_gen_config = model.generation_config
    model.generation_config = generation_config  # ship the checkpoint's own sampling defaults
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng or [_rng_state()],
                    "world_size": len(rng or [0]), "step": step, "config": asdict(cfg),
                    "prompts_sha256": prompts_digest},
                   tmp / "training_state.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        raise OSError(f"cannot write {final}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                      + (f"{previous} is intact" if previous else "no earlier checkpoint exists")) from None
    finally:
        model.generation_config = model_gen_config
    old = out / f".old-{name}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoint-N folders in out, oldest first."""
    return sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())


def latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1][1] if found else None


def intact_checkpoint(out: Path, verbose: bool = True) -> tuple[Path, dict]:
    """The newest checkpoint in `out` that loads, and its training state. A broken one (a truncated or
    empty training_state.pt, missing weights) is named on stderr (when verbose) and the one before it
    is tried."""
    found = _checkpoints(out)
    if not found:
        raise ValueError(f"--resume: no checkpoint in {out}")
    broken = []
    for _, path in reversed(found):
        try:
            if not (path / "config.json").is_file() or not any(path.glob("model*.safetensors")):
                raise ValueError("no model weights")
            state = torch.load(path / "training_state.pt", weights_only=True)
            if not {"optimizer", "scheduler", "rng", "step", "config"} <= state.keys():
                raise ValueError("training_state.pt lacks fields")
        except Exception as e:  # noqa: BLE001  (a damaged file fails in many ways: pickle, zip, EOF, OS)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if verbose:
                print(f"warning: {path} is broken ({reason[:120]}); trying the checkpoint before it", file=sys.stderr)
            broken.append(path.name)
            continue
        return path, state
    raise ValueError(f"--resume: no intact checkpoint in {out} (broken: {', '.join(broken)})")


# Settings a resumed run may change: where and how fast it runs, what it records, how far it goes. Any
# other difference from the checkpoint's config would silently change what the run computes.
RESUME_MAY_CHANGE = {"out", "resume", "device", "max_steps", "save_every", "keep_checkpoints", "sample_every",
                     "num_samples", "micro_batch", "gen_batch", "verifier_token_budget", "logprob_chunk",
                     "cache", "compile_decode", "rollout_dtype",
                     "gradient_checkpointing", "trust_remote_code", "demo", "dist_timeout"}


def check_resume(cfg: Config, state: dict, prompts: list[str]) -> None:
    """Refuse, naming it, any setting that differs from the checkpoint's and changes what is computed
    (model, verifier, reward, data, optimizer, schedule), and prompts whose content changed."""
    saved = state["config"]
    for f in fields(Config):
        if f.name in RESUME_MAY_CHANGE:
            continue
        was = saved.get(f.name, f.default)  # older checkpoints: the default
        if was != getattr(cfg, f.name):
            raise ValueError(f"--resume: --{f.name.replace('_', '-')} was {was!r} in the checkpoint, now "
                             f"{getattr(cfg, f.name)!r}; resume with the same value, or start a new --out")
    sha = state.get("prompts_sha256")
    if sha is not None and sha != prompts_sha(prompts):
        raise ValueError(f"--resume: the prompts from {cfg.prompts} are not the ones the checkpoint trained on "
                         "(the file or dataset changed); restore them, or start a new --out")


def prompts_sha(prompts: list[str]) -> str:
    """Fingerprint of the run's prompts, in training order."""
    import hashlib
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of steps <= step (a resume after a kill would otherwise repeat steps)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut off by the kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    tmp.replace(path)


def prune_checkpoints(out: Path, keep: int) -> None:
    found = _checkpoints(out)
    for _, p in found[:-keep] if keep > 0 else found:
        shutil.rmtree(p)


# --- the run -----------------------------------------------------------------------------------------

def _device(cfg: Config, ranks: Ranks | None = None) -> torch.device:
    """The device of this rank: --device, with a bare "cuda" (or auto on a GPU machine) meaning this
    rank's local GPU under torchrun."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(name)
    if device.type == "cuda" and device.index is None and ranks is not None and ranks.world > 1:
        device = torch.device("cuda", ranks.local)
    return device


def shared_share(rollout: Rollout, group_size: int) -> float:
    """Share of response positions where every response of the group has the same tokens so far
    (a common opening); their rewards are identical by construction (reward.py, item 6), so A = 0."""
    shared = 0
    for g in range(0, rollout.response.shape[0], group_size):
        ids, mask = rollout.response[g:g + group_size], rollout.mask[g:g + group_size]
        same = ((ids == ids[:1]) & mask).all(0)                     # (T,) equal and present in all
        shared += group_size * int(same.cumprod(0).sum())           # the common prefix's length
    return shared / max(int(rollout.mask.sum()), 1)


def _stats(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return (float(x.mean()), float(x.std())) if len(x) else (float("nan"), float("nan"))


def log_samples(path: Path, step: int, rollout: Rollout, token_rewards, gen_tokenizer, k: int) -> list[dict]:
    """A few responses with each generator token's verifier surprise -r_t (None where masked)."""
    out = []
    for b in range(min(k, len(rollout.texts))):
        n = int(rollout.mask[b].sum())
        ids = rollout.response[b, :n].numpy()
        pieces = [decode_response(token_bytes(gen_tokenizer, [i])).text for i in ids]
        surprise = None
        if token_rewards is not None:
            surprise = [round(-float(token_rewards[b, t]), 3) if token_rewards[b, t] != 0 else None for t in range(n)]
        out.append({"step": step, "prompt": rollout.prompts[b], "response": rollout.texts[b],
                    "tokens": pieces, "surprise": surprise})
    with open(path, "a", encoding="utf-8") as f:
        for s in out:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return out


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Training curves from metrics.jsonl to a PNG (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = [("reward_mean", "reward (mean r)"), ("cme_mean", "verifier CME"), ("len_mean", "response length"),
            ("grad_norm", "grad norm")]
    keys = [(k, t) for k, t in keys if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, (k, title) in zip(np.atleast_1d(axes), keys):
        ax.plot([r["step"] for r in rows], [r.get(k) for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_generator(name: str, device, trust_remote_code: bool = False, dtype: torch.dtype | None = torch.float32):
    """The generator, by default in fp32 master weights (bf16 autocast on GPU), with its shipped sampling
    defaults set aside so they cannot leak into rollouts (dtype None: bf16 on CUDA, for inference).

    Returns (model, tokenizer, shipped GenerationConfig (restored in saved checkpoints), stop ids: the
    union of EOS ids and the chat template's end of turn, see `stop_token_ids`).
    """
    from transformers import GenerationConfig

    model, tok = load_causal_lm(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    shipped = model.generation_config
    model.generation_config = GenerationConfig()
    stop = stop_token_ids(tok, shipped)
    if not stop:
        raise ValueError(f"generator {name!r} has no EOS token: its responses could never end")
    return model, tok, shipped, stop


def train(cfg: Config, on_step=None) -> list[dict]:
    """Run CME-GRPO as configured; return the per-step metrics.

    on_step: optional callable(step, rollout) -> dict of extra metrics for that step's line (the demo
        scores each step's rollouts under a fixed evaluation verifier this way).
    """
    from tqdm import tqdm

    check_config(cfg)
    ranks = init_ranks(cfg)
    out = Path(cfg.out)
    device = _device(cfg, ranks)
    prompts = load_prompts(cfg)
    resume_from, state = intact_checkpoint(out, ranks.main) if cfg.resume else (None, None)
    if state is not None:
        check_resume(cfg, state, prompts)
        if state.get("world_size", 1) != ranks.world:
            raise ValueError(f"--resume: the checkpoint was written by {state.get('world_size', 1)} ranks and this "
                             f"run has {ranks.world}; resume with the same number of processes")
    digest = prompts_sha(prompts)

    model, gen_tok, shipped, eos_ids = load_generator(str(resume_from or cfg.gen), device, cfg.trust_remote_code)
    vocab_bytes(gen_tok)  # an unsupported tokenizer (WordPiece) fails here, before any rollout
    prompts = fit_context(prompts, gen_tok, model, cfg, ranks.main)
    steps_per_epoch = len(prompts) // cfg.prompts_per_step
    total_steps = steps_per_epoch * cfg.epochs
    # what the generator sees, so a reader can check it: the first prompt rendered, and the stop tokens
    seen = {"rendered_first_prompt": chat_prefix(gen_tok, prompts[0], cfg.system_prompt),
            "stop_tokens": gen_tok.convert_ids_to_tokens(eos_ids), "prompts_sha256": digest,
            "world_size": ranks.world}
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps({"config": asdict(cfg), **seen}, indent=1, ensure_ascii=False), flush=True)
        (out / "config.json").write_text(json.dumps({**asdict(cfg), **seen}, indent=1, ensure_ascii=False))

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    ref_model = None
    if cfg.beta > 0:  # beta = 0: no reference model is loaded at all
        # loaded exactly like the policy (fp32, the same autocast), so KL = 0 before the first update
        ref_model = load_generator(cfg.gen, device, cfg.trust_remote_code)[0].requires_grad_(False).eval()
    verifier = None
    if cfg.reward != "rent":
        dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.verifier_dtype]  # auto: bf16 on GPU
        vmodel, vtok = load_causal_lm(cfg.verifier, dtype=dtype, device=device, init=cfg.verifier_init, seed=cfg.seed,
                                      trust_remote_code=cfg.trust_remote_code)  # frozen
        vocab_bytes(vtok)  # likewise for the verifier's tokenizer
        verifier = Verifier(vmodel, vtok, cfg.verifier_token_budget, cfg.logprob_chunk, cfg.mask_whitespace)

    sampler = rollout_model(model, cfg)  # the policy itself unless --rollout-dtype bf16
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total_steps))
    start = 0
    if resume_from is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        _set_rng_state(rng[ranks.rank] if isinstance(rng, list) else rng)  # older checkpoints: one dict
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

    def checkpoint(step: int) -> Path | None:
        rng = gather_rng_states(ranks)  # every rank takes part; rank 0 writes
        if not ranks.main:
            return None
        return save_checkpoint(out, f"checkpoint-{step}", model, gen_tok, shipped, optimizer, scheduler, step, cfg,
                               digest, rng)

    stop = total_steps if cfg.max_steps <= 0 else min(total_steps, cfg.max_steps)
    per_rank = cfg.prompts_per_step // ranks.world
    history = []
    bar = tqdm(total=stop, initial=start, desc="cme-grpo", unit="step", dynamic_ncols=True, disable=not ranks.main)
    # The first Ctrl-C or SIGTERM asks to stop at the end of the current step (checkpoint, exit 130); a
    # second aborts. Under torchrun the ranks agree on it at each step's end, so they stop together.
    stop_requested = []

    def on_sigint(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(True)
        if ranks.main:
            tqdm.write("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM (what schedulers such as SLURM send before killing a job) takes the same path as Ctrl-C
    previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for step in range(start, stop):
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            k = step % steps_per_epoch
            batch = prompts[k * cfg.prompts_per_step:(k + 1) * cfg.prompts_per_step]
            batch = batch[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]  # whole groups: this rank's share
            rollout = generate(sampler, gen_tok, batch, cfg, eos_ids, device)
            t1 = time.perf_counter()
            adv, reward, cme, token_rewards = score(rollout, cfg, verifier, gen_tok, model, device)
            t2 = time.perf_counter()
            upd = policy_update(model, ref_model, optimizer, scheduler, rollout, adv, cfg, device, ranks)
            refresh_rollout_model(sampler, model)
            t3 = time.perf_counter()

            m = {"step": step + 1, **step_metrics(all_gather(step_record(rollout, adv, reward, cme, cfg, (t0, t1, t2, t3)),
                                                             ranks)),
                 **upd, "lr": scheduler.get_last_lr()[0]}
            if device.type == "cuda":
                m["peak_mem_gb"] = max(all_gather(torch.cuda.max_memory_allocated() / 2 ** 30, ranks))
            if on_step is not None:
                m.update(on_step(step + 1, rollout))
            history.append(m)
            if ranks.main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(m) + "\n")
                if upd["skipped"]:
                    tqdm.write(f"step {step + 1}: non-finite loss or gradient, step skipped (weights unchanged)")
                if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                    tr = token_rewards
                    if tr is None and verifier is not None:
                        n = min(cfg.num_samples, len(rollout.texts))
                        tr, _ = verifier.token_rewards(rollout.prompts[:n], gen_tok,
                                                       [rollout.response[b, :int(rollout.mask[b].sum())].numpy()
                                                        for b in range(n)])
                    for smp in log_samples(out / "samples.jsonl", step + 1, rollout, tr, gen_tok, cfg.num_samples):
                        tqdm.write(f"[step {step + 1}] {smp['prompt'][:60]!r} -> {smp['response'][:120]!r}")
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['len_mean']:.0f}", s=f"{m['step_time']:.1f}")
            bar.update(1)
            stopping = all_sum([float(bool(stop_requested))], ranks, device)[0] > 0  # any rank asked
            if (step + 1) % cfg.save_every == 0 and step + 1 < stop and not stopping:
                checkpoint(step + 1)
                if ranks.main:
                    prune_checkpoints(out, cfg.keep_checkpoints)
            if stopping:
                path = checkpoint(step + 1)
                bar.close()
                if ranks.main:
                    print(f"interrupted: saved {path}; continue with --resume", file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        bar.close()  # before any error message, which must be the last line
        if main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    path = checkpoint(stop)
    if ranks.main:
        prune_checkpoints(out, max(cfg.keep_checkpoints, 1))
        if (out / "metrics.jsonl").exists():
            plot_curves(out / "metrics.jsonl", out / "curves.png")
        print(f"saved {path} (load it with AutoModelForCausalLM.from_pretrained); curves in {out / 'curves.png'}",
              flush=True)
    return history


def step_record(rollout: Rollout, adv: torch.Tensor, reward, cme, cfg: Config, times: tuple) -> dict:
    """What one rank contributes to a step's metrics: raw per-response values, so the statistics over
    ranks are computed on their union exactly as one process would (never a mean of means)."""
    t0, t1, t2, t3 = times
    groups = adv.reshape(-1, cfg.group_size * (adv.numel() // adv.shape[0]))
    shared = shared_share(rollout, cfg.group_size) * max(int(rollout.mask.sum()), 1)
    return {"reward": np.asarray(reward, dtype=np.float64), "cme": None if cme is None else np.asarray(cme),
            "lengths": rollout.mask.sum(1).numpy(), "truncated": rollout.truncated.numpy(),
            "zero_spread": (groups.abs().sum(1) == 0).numpy(), "shared": shared,
            "times": (t1 - t0, t2 - t1, t3 - t2, t3 - t0)}


def step_metrics(records: list[dict]) -> dict:
    """A step's metrics from every rank's `step_record`, rank 0 first. Times are the slowest rank's."""
    cat = {k: np.concatenate([r[k] for r in records]) for k in ("reward", "lengths", "truncated", "zero_spread")}
    lengths = cat["lengths"]
    t_gen, t_score, t_update, t_step = np.max([r["times"] for r in records], axis=0)
    m = dict(zip(("reward_mean", "reward_std"), _stats(cat["reward"])))
    if records[0]["cme"] is not None:
        m.update(zip(("cme_mean", "cme_std"), _stats(np.concatenate([r["cme"] for r in records]))))
    m.update({"zero_spread_groups": float(cat["zero_spread"].mean()),
              "shared_positions": sum(r["shared"] for r in records) / max(int(lengths.sum()), 1),
              "len_mean": float(lengths.mean()), "len_max": int(lengths.max()),
              "truncated": float(cat["truncated"].mean()), "tokens_per_s": float(lengths.sum() / t_step),
              "time_gen": float(t_gen), "time_score": float(t_score), "time_update": float(t_update),
              "step_time": float(t_step)})
    return m


# --- main --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        if cfg.demo:
            from demo import run_demo
            run_demo(cfg)
        else:
            train(cfg)
    except KeyboardInterrupt:
        return 130
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory; try --micro-batch {max(1, cfg.micro_batch // 2)}, "
              f"--gen-batch {max(1, cfg.gen_batch // 2)} or --gradient-checkpointing", file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:
        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
