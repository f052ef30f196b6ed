"""What a run maximises: one function per `--reward`, from a step's responses to their rewards.

    python train.py --reward token      # Eq. 1 (the default): the verifier's log-prob of each token
    python train.py --reward sequence   # Eq. 3: minus the verifier's CME of each response
    python train.py --reward rkl        # Eq. 1 less the policy's own log-prob: reverse KL (Appendix C)
    python train.py --reward rent       # the self-entropy baseline of Table 2

A reward is a function `(Batch) -> Rewards`, named in REWARDS; `--reward NAME` picks it (config.py takes
its choices from REWARDS). train.score turns what it returns into advantages:
  - per-token rewards (B, T), with the positions that have one, get per-position advantages over each
    prompt's G responses (grpo.per_position_advantages, the paper's Eq. 1 normalisation);
  - per-response rewards (B,) get group advantages (grpo.sequence_advantages, Eq. 3's);
  - first, a response with nothing scored gets its group's lowest reward (grpo.floor_unscored).
Adding a reward is one function here and its name in REWARDS; docs/rewards.md shows one in ten lines.

Shape letters: B responses of the step (prompts x G, each prompt's G adjacent), T response tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from grpo import floor_unscored

__all__ = ["Batch", "Rewards", "REWARDS", "token", "sequence", "rkl", "rent", "aligned", "verifier_logs"]


@dataclass
class Batch:
    """What a reward may read.

    rollout: the step's responses (sampling.Rollout: prompts, response ids (B, T) int64, mask (B, T) bool,
        truncated (B,) bool, texts); cfg: the run's config.Config; verifier: the frozen reward.Verifier
        (None under `--reward rent`, which loads none); gen_tokenizer: the policy's tokenizer.
    policy: policy(with_entropy=False) -> log pi_old(y_t | x, y_<t), (B, T) float32 on the CPU, at the
        sampling temperature, 0 past each response; with_entropy=True: (log-probs, entropies), both (B, T).
    """
    rollout: object
    cfg: object
    verifier: object
    gen_tokenizer: object
    policy: Callable

    def floor(self, rewards: torch.Tensor, valid: torch.Tensor | None = None):
        """grpo.floor_unscored on this batch: a response with nothing scored gets its group's lowest
        reward, or -log V of the verifier where its whole group has none. rewards, valid: as in Rewards."""
        present = None if valid is None else self.rollout.mask
        default = self.verifier.uniform_logprob if self.verifier is not None else math.nan
        return floor_unscored(rewards, valid, present, self.cfg.group_size, default)


@dataclass
class Rewards:
    """What a reward returns.

    rewards: (B, T) float32 per token, with valid (B, T) bool: the positions that have a reward; or (B,)
        float64 per response, NaN where a response has nothing to score, with valid None.
    cme: (B,) float64, the verifier's CME of each response, logged as cme_mean (None: not logged).
    surprise: (B, T) float32, the verifier's aligned token log-probs, shown in samples.jsonl (or None).
    """
    rewards: torch.Tensor
    valid: torch.Tensor | None = None
    cme: np.ndarray | None = None
    surprise: torch.Tensor | None = None


def aligned(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1's r_{i,t} = log p_verifier(y_{i,t} | x, y_{i,<t}), aligned onto the generator's tokens by
    character overlap (reward.Verifier.token_rewards, Appendix B): (rewards (B, T) float32, valid (B, T) bool)."""
    r = batch.rollout
    B, T = r.response.shape
    ended = (~r.truncated).tolist() if batch.cfg.eos_reward else None
    ids = [r.response[b, :int(r.mask[b].sum())].numpy() for b in range(B)]
    narrow, narrow_valid = batch.verifier.token_rewards(r.prompts, batch.gen_tokenizer, ids, ended=ended)
    rewards, valid = torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool)  # as wide as the longest response
    rewards[:, :narrow.shape[1]], valid[:, :narrow.shape[1]] = narrow, narrow_valid
    return rewards, valid


def verifier_logs(batch: Batch, rewards: torch.Tensor, valid: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """The verifier's CME per response (B,) float64 and its aligned log-probs (B, T), for the logs, from
    `aligned`'s (rewards, valid), unscored responses floored as their advantages are."""
    scored, counted = batch.floor(rewards, valid)
    return (-scored.double().sum(1) / counted.sum(1).clamp(min=1)).numpy(), scored


def token(batch: Batch) -> Rewards:
    """Eq. 1, the verifier's log-prob of each token, aligned onto the generator's tokens."""
    rewards, valid = aligned(batch)
    return Rewards(rewards, valid, *verifier_logs(batch, rewards, valid))


def sequence(batch: Batch) -> Rewards:
    """Eq. 3, minus the verifier's CME (mean token surprise) of each response."""
    ended = (~batch.rollout.truncated).tolist() if batch.cfg.eos_reward else None
    cme = batch.verifier.sequence_cme(batch.rollout.prompts, batch.rollout.texts, ended=ended)
    r, _ = batch.floor(torch.from_numpy(-cme))
    return Rewards(r, cme=-r.numpy())


def rkl(batch: Batch) -> Rewards:
    """Eq. 1 less the policy's own log-prob, reverse KL to the verifier (Appendix C without its entropy term)."""
    rewards, valid = aligned(batch)  # r_{i,t} = log p_verifier(aligned y_{i,t}) - log pi_old(y_{i,t})
    return Rewards(torch.where(valid, rewards - batch.policy(), 0.0), valid, *verifier_logs(batch, rewards, valid))


def rent(batch: Batch) -> Rewards:
    """RENT, the self-entropy baseline of Table 2, minus the mean entropy of the policy's next-token distributions."""
    _, entropy = batch.policy(with_entropy=True)
    return Rewards(-(entropy.sum(1) / batch.rollout.mask.sum(1).clamp(min=1)).double())


REWARDS: dict[str, Callable[[Batch], Rewards]] = {"token": token, "sequence": sequence, "rent": rent, "rkl": rkl}
"""--reward's choices: name -> function. Add yours here (docs/rewards.md)."""
