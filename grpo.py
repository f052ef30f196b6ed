"""GRPO advantages and the clipped objective of CME-GRPO: Eq. (2) and Appendix A of the paper.

    r_{i,t}   = -CME_{i,t}                                          (Eq. 1; computed in reward.py)
    A_{i,t}   = (r_{i,t} - mu_t) / sigma_t over the G responses of a prompt, at position t
    rho_{i,t} = pi_theta(y_{i,t} | x, y_{i,<t}) / pi_theta_old(y_{i,t} | x, y_{i,<t})
    L = -1/G sum_i 1/|y_i| sum_t min(rho A, clip(rho, 1-eps, 1+eps) A) + beta KL(pi_theta || pi_ref)   (Eq. 2)

Choices the paper leaves open, stated here once:
  1. sigma is the *unbiased* standard deviation (divide by n - 1, as torch.std and TRL's GRPO), over the
     valid entries at a position. A position with fewer than 2 valid entries, with all entries equal, or
     with sigma <= eps (the noise floor SIGMA_FLOOR) gets advantage 0, never NaN. Normalised advantages
     then have mean 0 and unbiased std 1 at every other position.
  2. The KL term is the k3 estimator exp(q - p) - (q - p) - 1 with p = log pi_theta, q = log pi_ref
     (Schulman, "Approximating KL divergence", 2020; DeepSeekMath Eq. 4), aggregated exactly like the
     policy term: the per-sequence token mean, then the mean over sequences.
  3. "Mean over sequences" divides by `num_sequences`, which the caller sets to the number of
     responses in the whole optimizer step; each micro-batch's loss is then its exact share and
     summing micro-batch gradients gives the full-batch gradient (no normaliser hidden in state).
  4. |y_i| counts every response token (the loss mask). Tokens the reward masks keep A = 0, so they
     add nothing to the policy term, but they still count in |y_i| and in the KL term.

Variants from the GRPO literature, off by default (`grpo_loss`'s loss_type and clip_eps_high):
  - "dr_grpo" (Liu et al. 2025, "Understanding R1-Zero-Like Training"): sum_t instead of 1/|y_i| sum_t,
    divided by the constant G * L_max, so a long response's tokens weigh as much as a short one's;
  - "token" (DAPO, Yu et al. 2025): every token of the step weighs the same, 1 / sum_i |y_i|;
  - clip_eps_high (DAPO's clip-higher): the ratio is clipped to [1 - eps, 1 + eps_high].

Shape letters: B responses (B = number of prompts x G), G group size, T generator tokens, L sequence
length (prompt + response), V vocabulary, H hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["SIGMA_FLOOR", "LOSS_TYPES", "token_logprobs", "per_position_advantages", "sequence_advantages", "grpo_loss"]

LOSS_TYPES = ("grpo", "dr_grpo", "token")
"""How `grpo_loss` aggregates per-token terms: Eq. 2's per-sequence mean, Dr. GRPO's constant, DAPO's token mean."""

SIGMA_FLOOR = 0.02
"""Nats. A reward spread at or below this is numerical noise, not signal: its advantages are 0.
Measured with `python bench_noise.py` (real gemma-3-270m verifier in bf16 on CPU, G = 8): the sigma of
rewards that are exactly equal but computed in different micro-batches reached 0.0167 nats at most
(99th percentile 0.0024), while real spreads across a group have a 1st percentile of 0.25-0.55 nats.
Identical contexts no longer reach this floor at all (reward.py, item 6); it is a safety net."""


# --- per-token log-probabilities under a causal LM ---------------------------------------------------

def _head(model, temperature: float = 1.0):
    """(weight (V, H), bias or None, transform of the logits) of a causal LM's output layer; the
    transform ends with the division by the sampling temperature, as generate() applies it. The
    transform is applied to float32 logits (`_chunk_logprobs`)."""
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2/3: cap * tanh(logits / cap)
    scale = getattr(cfg, "logit_scale", None)            # Cohere: logits * logit_scale
    divide = getattr(cfg, "logits_scaling", None)        # Granite: logits / logits_scaling

    def transform(logits):
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if temperature != 1.0:
            logits = logits / temperature
        return logits
    return lm_head.weight, getattr(lm_head, "bias", None), transform


def _chunk_logprobs(hidden, targets, weight, bias, transform, with_entropy: bool):
    """log p(targets) (and entropy) for N positions: hidden (N, H), targets (N,) -> (N,) float32."""
    logits = F.linear(hidden, weight, bias)                      # (N, V), the only V-wide tensor
    # bf16 -> fp32 before any arithmetic: soft-capping and the temperature in fp32, as sampling divides
    # fp32 logits (dividing bf16 logits of tens by 0.7 moved log-probs by up to 0.3 nats in a test)
    logits = transform(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    lse = torch.logsumexp(logits, dim=-1)                        # (N,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    p = torch.softmax(logits, dim=-1)
    return logp, lse - (p * logits).sum(-1)                      # H = logsumexp - E_p[logit]


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   target_mask: torch.Tensor | None = None, chunk_size: int = 1024,
                   with_entropy: bool = False, temperature: float = 1.0):
    """Per-token log-probabilities of the given tokens under a causal LM, chunked over positions.

    model: a transformers causal LM (`*ForCausalLM`).
    input_ids: (B, L) int64. attention_mask: (B, L) {0, 1}, right padding (None: all ones).
    target_mask: (B, L) bool, the positions whose log-probability is wanted (None: all but position 0).
    chunk_size: positions per output-layer chunk. The float32 logits of at most chunk_size positions
        exist at once (chunk_size x V x 4 bytes: 1 GiB for V = 262,144 at 1,024), never (B, L, V).
    with_entropy: also return the entropy of the model's next-token distribution (RENT baseline).
    temperature: the logits are divided by it (after any soft-capping): the distribution that
        generate(temperature=...) samples from. The verifier scores at 1.
    Returns logp (B, L) float32 (float64 for a float64 model) with logp[b, j] = log p(input_ids[b, j] | input_ids[b, :j]) where
    target_mask[b, j] and 0 elsewhere (position 0 has no context and is always 0); with_entropy, also
    entropy (B, L) float32 of the distribution that predicted position j.
    Gradient flows when autograd is enabled; each chunk's logits are then recomputed in the backward
    pass (activation checkpointing) so the memory bound above holds for training too.
    """
    B, L = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if target_mask is None:
        target_mask = torch.ones_like(input_ids, dtype=torch.bool)
    target_mask = target_mask.bool().clone()
    target_mask[:, 0] = False
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state  # (B, L, H)
    where = target_mask[:, 1:]                                       # (B, L-1): predicted positions
    h = hidden[:, :-1][where]                                        # (N, H)
    targets = input_ids[:, 1:][where]                                # (N,)
    weight, bias, transform = _head(model, temperature)
    grad = torch.is_grad_enabled() and h.requires_grad
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], targets[i:i + chunk_size], weight, bias, transform, with_entropy)
        lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    flat = torch.cat(logps) if logps else h.new_zeros(0, dtype=out_dtype)
    logp = hidden.new_zeros(B, L, dtype=out_dtype)
    logp[:, 1:] = logp[:, 1:].masked_scatter(where, flat)
    if not with_entropy:
        return logp
    entropy = hidden.new_zeros(B, L, dtype=out_dtype)
    if ents:
        entropy[:, 1:] = entropy[:, 1:].masked_scatter(where, torch.cat(ents))
    return logp, entropy


# --- advantages ------------------------------------------------------------------------------------

def per_position_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                            eps: float = SIGMA_FLOOR) -> torch.Tensor:
    """A_{i,t} = (r_{i,t} - mu_t) / sigma_t across the G responses of each prompt at position t.

    rewards: (B, T) float, r_{i,t} (Eq. 1); rows i*G .. i*G+G-1 are the G responses of prompt i.
    mask: (B, T) bool, valid entries (positions past a response's end, or with no verifier
        counterpart, are False and take no part in mu_t and sigma_t).
    group_size: G; B must be a multiple of it. eps: sigma below this counts as no spread.
    Returns (B, T) float32 advantages; 0 at masked entries and at positions with fewer than 2 valid
    entries or no spread. sigma_t is the unbiased standard deviation (module docstring, item 1).
    """
    B, T = rewards.shape
    if B % group_size:
        raise ValueError(f"batch of {B} responses is not a multiple of group size {group_size}")
    r = rewards.double().reshape(-1, group_size, T)  # (B/G, G, T); float64: spreads can be tiny
    m = mask.bool().reshape(-1, group_size, T)
    n = m.sum(1, keepdim=True)                                      # (B/G, 1, T) valid entries
    mu = torch.where(m, r, 0).sum(1, keepdim=True) / n.clamp(min=1)
    var = torch.where(m, (r - mu) ** 2, 0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    sigma = var.sqrt()
    rmax = torch.where(m, r, -torch.inf).amax(1, keepdim=True)
    rmin = torch.where(m, r, torch.inf).amin(1, keepdim=True)
    ok = m & (n >= 2) & (sigma > eps) & (rmax > rmin)               # equal rewards: exactly 0, any eps
    adv = torch.where(ok, (r - mu) / torch.where(ok, sigma, 1.0), 0.0)  # A_{i,t} = (r - mu_t) / sigma_t
    return adv.reshape(B, T).float()


def sequence_advantages(rewards: torch.Tensor, group_size: int, eps: float = SIGMA_FLOOR) -> torch.Tensor:
    """A_i = (r_i - mu) / sigma across the G responses of each prompt (Appendix A, sequence level).

    rewards: (B,) float, one scalar per response (e.g. -CME(y_i) of Eq. 3); a non-finite reward (the
    NaN CME of an empty response) is a masked entry. Same conventions as `per_position_advantages`.
    Returns (B,) float32.
    """
    valid = torch.isfinite(rewards)
    r = torch.where(valid, rewards, 0.0)
    return per_position_advantages(r[:, None], valid[:, None], group_size, eps)[:, 0]


def floor_unscored(rewards: torch.Tensor, valid: torch.Tensor | None, present: torch.Tensor | None,
                   group_size: int, default: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A response that leaves nothing to score (an empty answer, or only whitespace, which Appendix B
    masks) gets a reward no scored response is below: the lowest reward of its group, at every one of
    its tokens, or `default` (the caller's -log V, a uniform guess over the verifier's vocabulary) when
    no response of its group has one. Left out instead, it would have no advantage at all, so nothing
    would push the policy away from it, and a run could collapse into it unseen (a NaN mean reward).

    rewards: (B, T) float with valid (B, T) bool (scored positions) and present (B, T) bool (the
        response's tokens); or (B,) float, NaN where unscored (Eq. 3), with valid and present None.
    Returns (rewards, valid) of the same shapes, the unscored responses filled (finite, valid).
    """
    flat = rewards.dim() == 1
    r = rewards[:, None].clone() if flat else rewards.clone()
    v = torch.isfinite(r) if flat else valid.clone()
    p = torch.ones_like(v) if flat else present.bool()
    unscored = p.any(1) & ~v.any(1)                                   # (B,) something to say, nothing scored
    for b in unscored.nonzero().flatten().tolist():
        g = slice(b - b % group_size, b - b % group_size + group_size)
        scored = r[g][v[g]]
        r[b] = torch.where(p[b], scored.min() if scored.numel() else torch.tensor(default, dtype=r.dtype), r[b])
        v[b] = p[b]
    return (r[:, 0], v[:, 0]) if flat else (r, v)


# --- the loss --------------------------------------------------------------------------------------

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
              num_sequences: int | None = None, loss_type: str = "grpo", clip_eps_high: float | None = None,
              max_length: int | None = None, num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """The CME-GRPO objective, Eq. (2), and its variants (module docstring).

    logp: (B, T) float, log pi_theta(y_{i,t} | ...) with gradient.
    old_logp: (B, T) float, log pi_theta_old at sampling time (no gradient; equal to logp.detach()
        on-policy, where rho = 1).
    advantages: (B, T) per-token (Eq. 1 reward) or (B,) per-sequence (Eq. 3 reward) float.
    mask: (B, T) bool, response tokens (|y_i| = mask[i].sum()).
    clip_eps: the PPO clip epsilon. beta: KL coefficient; ref_logp (B, T) is required when beta > 0.
    num_sequences: the "G" of Eq. 2's 1/G, i.e. responses in the whole optimizer step when the step
        is split into micro-batches (default B).
    loss_type: "grpo" (Eq. 2) | "dr_grpo" | "token" (LOSS_TYPES).
    clip_eps_high: upper clip epsilon (default clip_eps: Eq. 2's symmetric clip).
    max_length: dr_grpo's L_max, the response-length limit (default T).
    num_tokens: token's normaliser, the loss-mask tokens of the whole optimizer step (default mask.sum()).
    Each normaliser is fixed by the caller for the whole step, so summing micro-batch losses gives the
    full-batch loss and gradient, for every loss_type.
    Returns (loss, metrics): loss a scalar tensor; metrics detached 0-dim tensors over valid tokens
    only: clip_frac (share of tokens whose clip is active), ratio_mean, kl (when ref_logp is given),
    tokens (the count they are averaged over, for weighting across micro-batches).
    """
    B, T = logp.shape
    m = mask.to(logp.dtype)
    if advantages.shape == (B,):
        advantages = advantages[:, None].expand(B, T)
    if advantages.shape != (B, T):
        raise ValueError(f"advantages of shape {tuple(advantages.shape)} fit neither (B,) nor (B, T) = {(B, T)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: must be one of {', '.join(LOSS_TYPES)}")
    num_sequences = B if num_sequences is None else num_sequences
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    length = m.sum(1).clamp(min=1)                                        # (B,) |y_i|

    ratio = torch.exp(logp - old_logp)                                    # rho_{i,t}
    pg1 = ratio * advantages
    pg2 = torch.clamp(ratio, 1 - clip_eps, 1 + clip_high) * advantages
    per_token = -torch.min(pg1, pg2)                                      # Eq. 2, policy term
    if ref_logp is not None:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1                                 # k3 estimator per token
        if beta > 0:
            per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / length).sum() / num_sequences    # Eq. 2: 1/G sum_i 1/|y_i| sum_t
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (num_sequences * (max_length or T))  # 1/(G L_max) sum_i sum_t
    else:
        loss = (per_token * m).sum() / max(num_tokens or m.sum().item(), 1)  # 1/(sum_i |y_i|) sum_i sum_t

    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = ((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + clip_high) & (advantages > 0))
        metrics = {"clip_frac": (clipped * m).sum() / n, "ratio_mean": (ratio * m).sum() / n, "tokens": m.sum()}
        if ref_logp is not None:
            metrics["kl"] = (kl * m).sum() / n
    return loss, metrics
