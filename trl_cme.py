"""CME-GRPO inside TRL's GRPOTrainer: the verifier reward (Eq. 3) and per-position advantages (Eq. 1).

    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from reward import Verifier, load_causal_lm
    from trl_cme import CMEGRPOTrainer, SequenceCME

    verifier = Verifier(*load_causal_lm("google/gemma-3-1b-it", dtype=torch.bfloat16, device="cuda"))
    tok = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    args = GRPOConfig(output_dir="out", loss_type="grpo", num_generations=8)
    # Eq. 3: a reward function like any other
    GRPOTrainer("Qwen/Qwen2.5-0.5B-Instruct", SequenceCME(verifier, tok), args=args, processing_class=tok,
                train_dataset=data).train()
    # Eq. 1: the token-level reward, normalised per position over each prompt's G completions
    CMEGRPOTrainer("Qwen/Qwen2.5-0.5B-Instruct", verifier, args=args, processing_class=tok,
                   train_dataset=data).train()
    # rkl: Eq. 1 less the policy's own log-prob (reverse KL to the verifier, objectives.rkl)
    CMEGRPOTrainer("Qwen/Qwen2.5-0.5B-Instruct", verifier, args=args, processing_class=tok,
                   train_dataset=data, reward="rkl").train()

What the verifier reads is what train.py's verifier reads (reward.py): the prompt in the verifier's own
chat template (a conversational prompt as the whole conversation, a plain-text prompt as the user turn),
then the completion's exact text, decoded from the sampled ids byte for byte (align.py).

1. `SequenceCME` is a reward function for `GRPOTrainer(reward_funcs=...)`: r_i = -CME(y_i), Eq. 3. An
   empty completion has no verifier token and gets None, which TRL leaves out of its group statistics.
   TRL then normalises per group with its own rule (std + 1e-4; grpo.py uses an unbiased std with a
   0.02-nat floor), so its advantages are not bit for bit this project's.
2. `CMEGRPOTrainer` is a GRPOTrainer whose advantages are (B, T): r_{i,t} aligned onto the policy's
   sampled ids (`reward.Verifier.token_rewards`), A_{i,t} = `grpo.per_position_advantages` over each
   prompt's G completions. With reward="rkl", r_{i,t} less log pi_old(y_{i,t}) at the sampling
   temperature (TRL's old_per_token_logps, or the same forward pass where TRL skips it), as
   `train.py --reward rkl`; the logged reward stays the verifier's. TRL's loss takes (B, T)
   advantages as they are; its "grpo" loss type is Eq. 2 (`LOSS_TYPES` maps the three that aggregate
   as grpo.py does; others are refused).
3. Groups across processes. TRL deals a generation batch out in contiguous slices, so with several
   processes one prompt's G completions can sit on different processes. Each process gathers every
   process's prompts and ids, scores only its own rows with the others as context (so a shared opening
   gets one value whoever scores it: reward.py, item 6), and the token rewards are gathered before the
   per-position statistics, so every process computes the same advantages and keeps its rows.
4. `CMEGRPOTrainer` overrides `GRPOTrainer._generate_and_score_completions`, which is not public API:
   it runs only on the TRL versions in TESTED_TRL, and says so in one line on any other.

TRL is an optional dependency: only this file (and compare_trl.py) imports it. Shape letters: B
completions (this process), N completions (all processes), T completion tokens, G group size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from align import decode_response, token_bytes, vocab_bytes
from grpo import floor_unscored, per_position_advantages
from reward import Verifier

__all__ = ["TESTED_TRL", "LOSS_TYPES", "check_trl", "everyone", "completion_texts", "SequenceCME", "TokenCME",
           "check_args", "CMEGRPOTrainer"]

TESTED_TRL = ("1.16.0",)
"""TRL versions whose GRPOTrainer internals CMEGRPOTrainer has been tested against."""

try:
    from trl import GRPOTrainer
except ImportError:
    raise ImportError(f"trl_cme.py needs TRL: pip install trl=={TESTED_TRL[-1]}") from None

LOSS_TYPES = {"grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "token"}
"""TRL loss types that aggregate per-token terms as grpo.grpo_loss does, and grpo.py's name for each:
"grpo" is Eq. 2 (the paper's), "dr_grpo" divides by B x max_completion_length, "dapo" by the tokens of
the whole generation batch. TRL's default is "dapo"; set loss_type="grpo" for the paper's loss."""


def check_trl() -> None:
    """One line, unless the installed TRL is one CMEGRPOTrainer was tested with."""
    import trl

    if trl.__version__ not in TESTED_TRL:
        raise RuntimeError(f"CMEGRPOTrainer overrides GRPOTrainer internals and is tested with trl "
                           f"{', '.join(TESTED_TRL)}; trl {trl.__version__} is installed: "
                           f"pip install trl=={TESTED_TRL[-1]}")


def everyone(values: list) -> tuple[list, list[int]]:
    """Every process's `values`, in process order (TRL's order), and the indices of this process's.

    values: this process's list (one item per completion). Without several processes: (values, all)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return list(values), list(range(len(values)))
    lengths = gather_object([len(values)])
    start = sum(lengths[:state.process_index])
    return gather_object(list(values)), list(range(start, start + len(values)))


def completion_texts(tokenizer, completion_ids: Sequence[Sequence[int]]) -> list[str]:
    """The exact text of each completion, decoded byte for byte from its ids (special tokens have none),
    as train.py's verifier reads it; TRL's own `completions` come from batch_decode."""
    return [decode_response(token_bytes(tokenizer, ids)).text for ids in completion_ids]


class SequenceCME:
    """TRL reward function: r_i = -CME(y_i), the sequence-level CME of Eq. 3 under the verifier.

    verifier: a reward.Verifier. tokenizer: the policy's fast tokenizer (the one that sampled the ids).
    Called by TRL with prompts (B strings or conversations), completions and completion_ids (B lists
    of int); returns B floats (-log V, a uniform guess, for an empty completion). Both tokenizers are checked here, so a
    tokenizer that cannot be aligned (WordPiece) fails before the first step.
    """

    __name__ = "cme"

    def __init__(self, verifier: Verifier, tokenizer):
        vocab_bytes(tokenizer), vocab_bytes(verifier.tokenizer)  # UnsupportedTokenizerError, one line
        self.verifier, self.tokenizer = verifier, tokenizer

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs) -> list:
        if completion_ids is None:
            raise TypeError("SequenceCME needs TRL's completion_ids (trl >= 0.17)")
        all_prompts, rows = everyone(prompts)
        all_ids, _ = everyone(completion_ids)
        cme = self.verifier.sequence_cme(all_prompts, completion_texts(self.tokenizer, all_ids), rows=rows)
        floor = self.verifier.uniform_logprob  # nothing to score: -log V, not None (TRL's nansum makes it 0, the best)
        return [floor if np.isnan(c) else float(-c) for c in cme]


class TokenCME:
    """The reward function CMEGRPOTrainer installs: token rewards r_{i,t} (Eq. 1) for this process's
    completions, kept in `last` as (rewards (B, T) float32, mask (B, T) bool, tokens (B, T) bool) for the trainer; TRL
    itself gets each completion's mean r_{i,t} (None where no token has a verifier counterpart),
    which it logs as rewards/token_cme/mean. tokenizer: set by the trainer once TRL has loaded it."""

    __name__ = "token_cme"

    def __init__(self, verifier: Verifier, tokenizer=None):
        self.verifier, self.tokenizer = verifier, tokenizer
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, prompts: list, completions: list, completion_ids: list, **kwargs) -> list:
        all_prompts, rows = everyone(prompts)
        all_ids, _ = everyone(completion_ids)
        rewards, mask = self.verifier.token_rewards(all_prompts, self.tokenizer, all_ids, rows=rows)
        present = torch.zeros_like(mask)  # the completions' tokens: grpo.floor_unscored fills those with none scored
        for i, r in enumerate(rows):
            present[i, :len(all_ids[r])] = True
        self.last = rewards, mask, present
        n = mask.sum(1)
        means = (rewards * mask).sum(1) / n.clamp(min=1)
        return [float(m) if k else None for m, k in zip(means.tolist(), n.tolist())]


def check_args(args) -> None:
    """One line for a GRPOConfig whose loss would not be Eq. 2 (or a variant grpo.py has) with (B, T)
    advantages."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={args.loss_type!r}: CMEGRPOTrainer supports {', '.join(LOSS_TYPES)} "
                         "(\"grpo\" is the paper's Eq. 2)")
    if args.importance_sampling_level != "token":
        raise ValueError("importance_sampling_level must be \"token\" with per-position advantages")
    if args.scale_rewards not in ("group", True):
        raise ValueError(f"scale_rewards={args.scale_rewards!r}: per-position advantages are normalised per "
                         "group (\"group\")")


class CMEGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with the token-level CME reward and per-position advantages (module docstring, 2-3).

    model, args and every other keyword: as GRPOTrainer's. verifier: a reward.Verifier; it replaces
    reward_funcs. Refused before any model is loaded: an untested TRL, a loss that is not in
    LOSS_TYPES; before the first step: a tokenizer that cannot be aligned.
    """

    def __init__(self, model, verifier: Verifier, args=None, reward: str = "token", **kwargs):
        check_trl()
        if reward not in ("token", "rkl"):
            raise ValueError(f"reward={reward!r}: CMEGRPOTrainer's rewards are per token, \"token\" (Eq. 1) or "
                             "\"rkl\" (Eq. 1 less the policy's log-prob); for Eq. 3 use SequenceCME")
        self.reward = reward
        if "reward_funcs" in kwargs:
            raise TypeError("CMEGRPOTrainer's reward is the verifier's token-level CME; pass verifier=, "
                            "not reward_funcs")
        if args is not None:
            check_args(args)
        self.token_cme = TokenCME(verifier)
        super().__init__(model, reward_funcs=[self.token_cme], args=args, **kwargs)
        check_args(self.args)
        vocab_bytes(self.processing_class), vocab_bytes(verifier.tokenizer)  # one line if not alignable
        self.token_cme.tokenizer = self.processing_class

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        own = self.policy_logprobs(out) if self.reward == "rkl" else None
        out["advantages"] = self.token_advantages(out["completion_ids"].shape[1], own)
        return out

    def policy_logprobs(self, out: dict) -> torch.Tensor:
        """log pi_old(y_t) of this process's completions, (B, T) float32, at the sampling temperature:
        TRL's own old_per_token_logps where it computed them, else the same forward pass."""
        if out.get("old_per_token_logps") is not None:
            return out["old_per_token_logps"]
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():
            return self._get_per_token_logps_and_entropies(self.model, ids, attention, out["completion_ids"].shape[1],
                                                           batch_size=self.args.per_device_train_batch_size)[0]

    def token_advantages(self, length: int, own: torch.Tensor | None = None) -> torch.Tensor:
        """(B, length) float32 A_{i,t} of this process's completions: the token rewards of the last
        scoring (less `own`, the policy's log-probs (B, length), under reward="rkl") gathered from every
        process, normalised per position over each group of G."""
        rewards, mask, present = self.token_cme.last
        self.token_cme.last = None
        B, T = rewards.shape
        if own is not None:  # rkl: r_{i,t} = log p_verifier(aligned y_t) - log pi_old(y_t)
            rewards = torch.where(mask, rewards - own[:, :T].float().cpu(), 0.0)
        device = self.accelerator.device
        local = torch.zeros(3, B, length, device=device)         # rewards, mask and tokens, one gather
        local[0, :, :T], local[1, :, :T], local[2, :, :T] = rewards, mask.float(), present.float()
        local = self.accelerator.pad_across_processes(local, dim=2)
        every = self.accelerator.gather(local.transpose(0, 1).contiguous()).transpose(0, 1)  # (3, N, T_max)
        G = self.num_generations if self.model.training else self.num_generations_eval
        r, m = floor_unscored(every[0].cpu(), every[1].cpu().bool(), every[2].cpu().bool(), G,
                              self.token_cme.verifier.uniform_logprob)
        advantages = per_position_advantages(r, m, G)                                       # (N, T_max)
        start = self.accelerator.process_index * B                                          # TRL's own slice
        logged = self._logs["advantages"]                 # TRL logged its scalar ones: the row means instead
        for _ in range(min(len(logged), advantages.shape[0])):
            logged.pop()
        m = m.float()
        logged.extend(((advantages * m).sum(1) / m.sum(1).clamp(min=1)).tolist())
        return advantages[start:start + B, :length].to(device)
