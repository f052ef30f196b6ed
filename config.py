"""A run's settings: every hyperparameter of `train.py`, its command line, and the checks made before any work.

Each field of `Config` carries its default (Appendix E of the paper), its help text and, for numbers, the
range `check_config` enforces, so the CLI, the checks and the docs come from one place. `RESUME_MAY_CHANGE`
names the settings a resumed run may change.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from distributed import rank_device
from grpo import SIGMA_FLOOR
from lora import require as require_peft
from objectives import REWARDS
from trackers import require

__all__ = ["Config", "parse_config", "check_config", "RESUME_MAY_CHANGE"]


def _f(default, help: str, **kw):
    """A Config field: its default, its help text, and optionally `choices` or a range rule `check`
    (">0", ">=1", "(0,1)", "(0,1]", "[0,1)") that check_config enforces."""
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
    reward: str = _f("token", "what the run maximises (objectives.py; add yours there): " + "; ".join(
        f"{name} = {fn.__doc__.splitlines()[0].rstrip('.')}" for name, fn in REWARDS.items()), choices=REWARDS)
    mask_whitespace: bool = _f(True, "mask whitespace-only generator tokens (Appendix B)")
    eos_reward: bool = _f(False, "reward the EOS position with the verifier's log-prob of its own end-of-turn "
                          "token (the paper gives EOS none: it has no text); truncated responses get none. It is "
                          "normalised with the text tokens' rewards, so it is a standing bonus or penalty for "
                          "stopping: measured, gemma-3-270m (base) gives 23-34 nats at SmolLM2's natural endings "
                          "against about 4 for text, a penalty (docs/choices.md)")
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
                    "and CUDA graphs need; off until measured on a GPU, docs/performance.md)", choices=["dynamic", "static"])
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
    max_prompt_tokens: int = _f(512, "skip prompts longer than this many generator tokens, chat template included, "
                                "with a count in the log, as the authors' code does (0: only the context limit; one "
                                "long prompt left-pads and sizes the KV cache of all the step's rollouts)",
                                check=">=0")
    lr: float = _f(3e-6, "AdamW peak learning rate (Appendix E: 3e-6 Qwen, 5e-6 Llama)", check=">0")
    weight_decay: float = _f(0.0, "AdamW weight decay", check=">=0")
    warmup_steps: int = _f(20, "linear warmup steps, then cosine decay to 0 over the epoch", check=">=0")
    grad_clip: float = _f(1.0, "gradient-norm clip", check=">0")
    clip_eps: float = _f(0.2, "PPO clip epsilon of Eq. 2", check="(0,1)")
    beta: float = _f(0.0, "KL coefficient of Eq. 2; 0 loads no reference model", check=">=0")
    lora_rank: int = _f(0, "train LoRA adapters of this rank instead of every weight (0: full fine-tuning); the frozen "
                        "weights in bf16 on a GPU; needs peft (lora.py)", check=">=0")
    lora_alpha: float = _f(32.0, "LoRA alpha: the adapters' scale is alpha / rank", check=">0")
    lora_dropout: float = _f(0.05, "dropout on the LoRA adapters' input (off with --num-iterations > 1, so that "
                                     "pi_old and pi_theta are one network)", check="[0,1)")
    lora_target_modules: str = _f("all-linear", "modules given adapters: comma-separated names (q_proj,v_proj) or "
                                  "all-linear (every linear layer but the output layer)")
    num_iterations: int = _f(1, "mu: policy updates per rollout batch (GRPO's mu). The old log-probs are computed once, "
                             "before the first, so Eq. 2's clip acts from the second; 1 (the paper): rho = 1",
                             check=">=1")
    loss_type: str = _f("grpo", "how Eq. 2's per-token terms are averaged: grpo (the paper: per response, then over "
                        "responses) | dr_grpo (Dr. GRPO: summed, over G x --max-new-tokens) | token (DAPO: over every "
                        "token of the step)", choices=["grpo", "dr_grpo", "token"])
    clip_eps_high: float = _f(0.0, "upper clip epsilon, DAPO's clip-higher (0: --clip-eps, the paper's symmetric clip)",
                              check=">=0")
    mask_truncated: bool = _f(False, "leave responses cut at --max-new-tokens out of the loss (DAPO's overlong "
                              "filtering; they still count in their group's advantages)")
    epochs: int = _f(1, "passes over the prompts", check=">=1")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: all); the schedule still spans the epochs", check=">=0")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: less memory, more compute")
    verifier_token_budget: int = _f(16384, "padded tokens per verifier micro-batch", check=">=1")
    logprob_chunk: int = _f(1024, "positions per output-layer chunk (float32 logits of this many exist)", check=">=1")
    out: str = _f("runs/cme-grpo", "output folder: metrics, samples, checkpoints, curves")
    save_every: int = _f(50, "checkpoint every N steps (and at the end)", check=">=1")
    keep_checkpoints: int = _f(2, "intermediate checkpoints kept on disk", check=">=0")
    report_to: str = _f("none", "stream the metrics, the config and sample tables to a tracker (rank 0): none | "
                        "tensorboard | wandb (WANDB_MODE=offline for no network) | trackio; an optional package",
                        choices=["none", "tensorboard", "wandb", "trackio"])
    sample_every: int = _f(10, "log samples with per-token verifier surprise every N steps", check=">=0")
    num_samples: int = _f(2, "samples logged each time", check=">=0")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    trust_remote_code: bool = _f(False, "allow model repos to run their own code")
    device: str = _f("auto", "auto | cpu | cuda")
    dist_timeout: int = _f(600, "torchrun: seconds a rank waits for the others in a collective before failing",
                           check=">=1")


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """Turn Config into a CLI: --field-name VALUE, booleans as --flag / --no-flag.
    argv: the arguments (None: sys.argv[1:]); description: the text --help opens with."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """Whether value satisfies a range rule of a Config field: ">0", ">=1", "(0,1)", "(0,1]", "[0,1)"."""
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    lo, hi = map(float, rule[1:-1].split(","))
    return (lo < value if rule[0] == "(" else lo <= value) and (value < hi if rule[-1] == ")" else value <= hi)


def check_config(cfg: Config) -> None:
    """Reject bad settings before any work, with one line naming the flag: a value outside its field's
    choices (a Config built in code skips argparse), every number against the range its field declares (NaN and infinity included: --grad-clip nan would write NaN weights,
    --grad-clip -1 trains backwards), and the device."""
    for f in fields(Config):
        rule, value, flag = f.metadata.get("check"), getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ValueError(f"{flag} {value!r}: choose from {', '.join(f.metadata['choices'])}")
        if rule is None:
            continue
        if not math.isfinite(value):
            raise ValueError(f"{flag} {value}: must be a finite number")
        if not _allowed(value, rule):
            if f.name == "group_size":
                raise ValueError(f"{flag} {value}: GRPO needs at least 2 responses per prompt")
            raise ValueError(f"{flag} {value}: must be {rule.replace('>=', 'at least ').replace('>', 'above ')}"
                             if rule[0] == ">" else f"{flag} {value}: must lie in {rule.replace(',', ', ')}")
    rank_device(cfg.device)
    require(cfg.report_to)
    if cfg.lora_rank:
        require_peft()
        if cfg.rollout_dtype != "fp32":
            raise ValueError("--rollout-dtype bf16 copies the whole policy; with --lora-rank sample from the policy "
                             "itself (--rollout-dtype fp32, whose frozen weights are already bf16 on a GPU)")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is a file; name a folder for the run")


# Settings a resumed run may change: where and how fast it runs, what it records, how far it goes. Any
# other difference from the checkpoint's config would silently change what the run computes.
RESUME_MAY_CHANGE = {"out", "resume", "device", "max_steps", "save_every", "keep_checkpoints", "sample_every",
                     "report_to", "num_samples", "micro_batch", "gen_batch", "verifier_token_budget", "logprob_chunk",
                     "cache", "compile_decode", "rollout_dtype",
                     "gradient_checkpointing", "trust_remote_code", "dist_timeout"}
