"""grpo.py: per-position advantages, the clipped objective (Eq. 2) and chunked log-probabilities."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo import LOSS_TYPES, SIGMA_FLOOR, grpo_loss, per_position_advantages, sequence_advantages, token_logprobs


# --- advantages --------------------------------------------------------------------------------------

def slow_advantages(r: np.ndarray, m: np.ndarray, G: int, eps: float) -> np.ndarray:
    """Loop over groups and positions; unbiased std over the valid entries."""
    out = np.zeros_like(r)
    for g in range(0, r.shape[0], G):
        for t in range(r.shape[1]):
            rows = [i for i in range(g, g + G) if m[i, t]]
            vals = np.array([r[i, t] for i in rows])
            if len(vals) < 2 or vals.std(ddof=1) <= eps:
                continue
            for i in rows:
                out[i, t] = (r[i, t] - vals.mean()) / vals.std(ddof=1)
    return out


@st.composite
def group_batch(draw):
    G = draw(st.integers(1, 5))
    P = draw(st.integers(1, 3))
    T = draw(st.integers(1, 7))
    vals = st.one_of(st.floats(-20, 0), st.sampled_from([-1.0, -2.0]))  # repeats make zero-spread columns
    r = np.array(draw(st.lists(vals, min_size=P * G * T, max_size=P * G * T))).reshape(P * G, T)
    m = np.array(draw(st.lists(st.booleans(), min_size=P * G * T, max_size=P * G * T))).reshape(P * G, T)
    return r, m, G


@given(group_batch())
def test_advantages_equal_slow_loop(batch):
    r, m, G = batch
    got = per_position_advantages(torch.tensor(r), torch.tensor(m), G).numpy()
    np.testing.assert_allclose(got, slow_advantages(r, m, G, SIGMA_FLOOR), rtol=1e-4, atol=1e-5)
    assert np.isfinite(got).all() and (got[~m] == 0).all()


@given(group_batch())
def test_advantages_have_zero_mean_and_unit_spread(batch):
    r, m, G = batch
    A = per_position_advantages(torch.tensor(r), torch.tensor(m), G).numpy().astype(np.float64)
    for g in range(0, r.shape[0], G):
        for t in range(r.shape[1]):
            a = A[g:g + G, t][m[g:g + G, t]]
            if np.abs(a).sum() == 0:
                continue  # fewer than 2 valid entries or no spread: all zero by definition
            assert abs(a.mean()) < 1e-5 and abs(a.std(ddof=1) - 1) < 1e-4


def test_degenerate_positions_get_zero_not_nan():
    r = torch.tensor([[1.0, 5.0, 2.0], [1.0, 7.0, 9.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    A = per_position_advantages(r, m, group_size=2)
    assert A.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # no spread; one valid; none valid


def test_sequence_advantages_match_per_position_and_mask_nan():
    r = torch.tensor([1.0, 2.0, 4.0, float("nan"), 1.0, 3.0, 3.0, 3.0, float("nan")])
    A = sequence_advantages(r, group_size=3)
    x = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(A[:3].numpy(), (x - x.mean()) / x.std(ddof=1), rtol=1e-6)
    np.testing.assert_allclose(A[3:6].numpy(), [0.0, -2 ** -0.5, 2 ** -0.5], rtol=1e-6)  # NaN masked
    assert A[6:].tolist() == [0.0, 0.0, 0.0]  # two valid entries with no spread
    per_pos = per_position_advantages(r[:3, None].expand(3, 4), torch.ones(3, 4, dtype=torch.bool), 3)
    np.testing.assert_allclose(per_pos.numpy(), A[:3, None].expand(3, 4).numpy())


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="multiple of group size"):
        per_position_advantages(torch.zeros(5, 2), torch.ones(5, 2, dtype=torch.bool), 2)


# --- the loss ---------------------------------------------------------------------------------------

def slow_loss(logp, old, adv, mask, eps, beta, ref, n_seq):
    """Eq. 2 with loops: -1/G sum_i 1/|y_i| sum_t [min(rho A, clip(rho) A) - beta k3]."""
    total = 0.0
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        s = 0.0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t] - old[i, t])
            a = adv[i] if adv.ndim == 1 else adv[i, t]
            s += -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            if beta:
                d = ref[i, t] - logp[i, t]
                s += beta * (math.exp(d) - d - 1)
        total += s / max(n, 1)
    return total / n_seq


@given(st.integers(1, 4), st.integers(1, 6), st.sampled_from([0.0, 0.1]), st.integers(0, 10_000))
def test_loss_equals_slow_loop_off_policy(B, T, beta, seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)  # ratios well outside 1 +- eps
    ref = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    loss, metrics = grpo_loss(logp, old, adv, mask, 0.2, beta, ref)
    assert math.isclose(loss.item(), slow_loss(logp.numpy(), old.numpy(), adv.numpy(), mask.numpy(), 0.2,
                                               beta, ref.numpy(), B), rel_tol=1e-9, abs_tol=1e-12)
    ratio = torch.exp(logp - old)[mask]
    a = adv[mask]
    if mask.any():
        clipped = ((ratio < 0.8) & (a < 0)) | ((ratio > 1.2) & (a > 0))
        assert math.isclose(metrics["clip_frac"].item(), clipped.double().mean().item(), abs_tol=1e-12)
        assert math.isclose(metrics["ratio_mean"].item(), ratio.mean().item(), rel_tol=1e-12)
        d = (ref - logp)[mask]
        assert math.isclose(metrics["kl"].item(), (torch.exp(d) - d - 1).mean().item(), rel_tol=1e-9)


def test_on_policy_gradient_has_closed_form():
    torch.manual_seed(0)
    B, T = 4, 6
    logp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    length = mask.sum(1, keepdim=True).double()
    expected = torch.where(mask, -adv / (length * B), 0.0)  # d loss / d logp = -A / (|y_i| B)
    torch.testing.assert_close(logp.grad, expected)


def test_sequence_and_broadcast_advantages_agree():
    torch.manual_seed(1)
    logp = -torch.rand(3, 5, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(3, 5, dtype=torch.float64)
    adv = torch.randn(3, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.2
    a, _ = grpo_loss(logp, old, adv, mask)
    b, _ = grpo_loss(logp, old, adv[:, None].expand(3, 5), mask)
    assert a.item() == b.item()


def test_padding_and_micro_batches_do_not_change_loss_or_gradient():
    torch.manual_seed(2)
    B, T = 6, 5
    base = -torch.rand(B, T, dtype=torch.float64)
    old = base + 0.3 * torch.randn(B, T, dtype=torch.float64)
    ref = base + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.3

    full = base.clone().requires_grad_()
    loss, m_full = grpo_loss(full, old, adv, mask, beta=0.05, ref_logp=ref)
    loss.backward()

    # padding: three extra columns of garbage, masked out
    pad = lambda x, v: torch.cat([x, torch.full((B, 3), v, dtype=x.dtype)], 1)  # noqa: E731
    padded = pad(base, -50.0).requires_grad_()
    loss_p, m_pad = grpo_loss(padded, pad(old, 9.0), pad(adv, 7.0), pad(mask, False), beta=0.05, ref_logp=pad(ref, 3.0))
    loss_p.backward()
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(padded.grad[:, :T], full.grad)
    assert (padded.grad[:, T:] == 0).all()
    for k in ("clip_frac", "ratio_mean", "kl"):
        torch.testing.assert_close(m_pad[k], m_full[k])

    # micro-batches of 2 + 4 responses with the step's sequence count: same sum and gradient
    split = base.clone().requires_grad_()
    total = 0
    for rows in (slice(0, 2), slice(2, 6)):
        part, _ = grpo_loss(split[rows], old[rows], adv[rows], mask[rows], beta=0.05, ref_logp=ref[rows],
                            num_sequences=B)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, loss.detach())
    torch.testing.assert_close(split.grad, full.grad)


def oracle_loss(logp, old, adv, mask, eps, eps_high, beta, ref, loss_type, n_seq, max_len, n_tok):
    """The loss variants written out token by token, with autograd through the loops."""
    total = 0.0
    for i in range(logp.shape[0]):
        s, n = 0.0, 0
        for t in range(logp.shape[1]):
            if mask[i, t]:
                rho = torch.exp(logp[i, t] - old[i, t])
                s = s - torch.minimum(rho * adv[i, t], torch.clamp(rho, 1 - eps, 1 + eps_high) * adv[i, t])
                d = ref[i, t] - logp[i, t]
                s = s + beta * (torch.exp(d) - d - 1)
                n += 1
        total = total + (s / max(n, 1) if loss_type == "grpo" else s)
    return total / {"grpo": n_seq, "dr_grpo": n_seq * max_len, "token": max(n_tok, 1)}[loss_type]


@settings(deadline=None, max_examples=60)
@given(st.sampled_from(LOSS_TYPES), st.integers(1, 4), st.integers(1, 6), st.sampled_from([0.0, 0.1]),
       st.sampled_from([None, 0.28]), st.integers(0, 10_000))
def test_loss_types_and_their_gradients_equal_a_slow_loop(loss_type, B, T, beta, eps_high, seed):
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = base + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    ref = base + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    n_seq, max_len, n_tok = B + 3, T + 2, int(mask.sum()) + 5  # a step larger than this micro-batch
    fast_in, slow_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, metrics = grpo_loss(fast_in, old, adv, mask, 0.2, beta, ref, n_seq, loss_type, eps_high, max_len, n_tok)
    want = oracle_loss(slow_in, old, adv, mask, 0.2, eps_high or 0.2, beta, ref, loss_type, n_seq, max_len, n_tok)
    assert math.isclose(loss.item(), torch.as_tensor(want).item(), rel_tol=1e-9, abs_tol=1e-12)
    if mask.any():
        loss.backward()
        want.backward()
        torch.testing.assert_close(fast_in.grad, slow_in.grad, rtol=1e-9, atol=1e-12)
        ratio, a = torch.exp(base - old)[mask], adv[mask]
        clipped = ((ratio < 0.8) & (a < 0)) | ((ratio > 1 + (eps_high or 0.2)) & (a > 0))
        assert math.isclose(metrics["clip_frac"].item(), clipped.double().mean().item(), abs_tol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_is_additive_over_micro_batches(loss_type):
    torch.manual_seed(3)
    B, T = 6, 5
    base = -torch.rand(B, T, dtype=torch.float64)
    old = base + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.3
    full = base.clone().requires_grad_()
    loss, _ = grpo_loss(full, old, adv, mask, loss_type=loss_type, max_length=8)
    loss.backward()
    split, total = base.clone().requires_grad_(), 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part, _ = grpo_loss(split[rows], old[rows], adv[rows], mask[rows], num_sequences=B, loss_type=loss_type,
                            max_length=8, num_tokens=int(mask.sum()))
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, loss.detach())
    torch.testing.assert_close(split.grad, full.grad)


def test_loss_types_weigh_long_and_short_responses_as_their_papers_say():
    """On-policy with A = 1 on every token: d loss / d logp per token is -1/(|y_i| G) for Eq. 2 (a short
    response's tokens weigh more), -1/(G L_max) for Dr. GRPO and -1/sum|y| for DAPO (every token alike)."""
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    grads = {}
    for loss_type in LOSS_TYPES:
        logp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
        grpo_loss(logp, logp.detach(), torch.ones(2, 4, dtype=torch.float64), mask, loss_type=loss_type,
                  max_length=4)[0].backward()
        grads[loss_type] = logp.grad[mask].tolist()
    assert grads["grpo"] == [-1 / 2, -1 / 8, -1 / 8, -1 / 8, -1 / 8]
    assert grads["dr_grpo"] == [-1 / 8] * 5 and grads["token"] == [-1 / 5] * 5


def test_masked_tokens_get_no_gradient():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.ones(2, 3), mask, beta=0.1, ref_logp=torch.full((2, 3), -1.0))
    loss.backward()
    assert (logp.grad[~mask] == 0).all() and (logp.grad[mask] != 0).all()


def test_bad_shapes_and_missing_reference():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages of shape"):
        grpo_loss(x, x, torch.zeros(3), x.bool())
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, x, x.bool(), beta=0.1)
    with pytest.raises(ValueError, match="loss_type 'dapo': must be one of grpo, dr_grpo, token"):
        grpo_loss(x, x, x, x.bool(), loss_type="dapo")


# --- token_logprobs against Hugging Face's own forward -----------------------------------------------

@pytest.fixture(scope="module", params=["qwen2", "gemma3", "llama"])
def tiny_model(request, built):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(built[request.param], dtype=torch.float64)


def reference_logprobs(model, ids, attn):
    logits = model(input_ids=ids, attention_mask=attn).logits  # the full (B, L, V) tensor
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1, dtype=lp.dtype), lp], 1)


def test_token_logprobs_match_hf_forward(tiny_model):
    torch.manual_seed(0)
    V = tiny_model.config.vocab_size
    ids = torch.randint(0, V, (3, 17))
    attn = torch.ones_like(ids)
    attn[1, 12:] = 0  # right padding
    want = attn.bool()
    with torch.no_grad():
        ref = reference_logprobs(tiny_model, ids, attn)
        for chunk in (1, 5, 1024):
            got = token_logprobs(tiny_model, ids, attn, want, chunk_size=chunk)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got[want & (torch.arange(17) > 0)], ref[want & (torch.arange(17) > 0)],
                                       rtol=1e-10, atol=1e-10)
            assert (got[~want] == 0).all() and (got[:, 0] == 0).all()
        lp, ent = token_logprobs(tiny_model, ids, attn, want, with_entropy=True)
        logits = tiny_model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        H = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        torch.testing.assert_close(ent[:, 1:][want[:, 1:]], H[want[:, 1:]], rtol=1e-10, atol=1e-10)


def test_token_logprobs_gradient_matches_unchunked(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    weights = torch.randn(2, 9, dtype=torch.float64)

    tiny_model.zero_grad()
    (token_logprobs(tiny_model, ids, chunk_size=4) * weights).sum().backward()
    chunked = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    (reference_logprobs(tiny_model, ids, torch.ones_like(ids)) * weights).sum().backward()
    for a, p in zip(chunked, tiny_model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)
    tiny_model.zero_grad()


def test_token_logprobs_divide_by_the_sampling_temperature(tiny_model):
    """log-probs at temperature T are those of softmax(logits / T), logits after any soft-capping: the
    distribution generate(temperature=T) samples from (a missing division fails this for T != 1)."""
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 11))
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[:, :-1] / 0.7               # HF applies the cap itself
        want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        H = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        lp, ent = token_logprobs(tiny_model, ids, with_entropy=True, temperature=0.7)
    torch.testing.assert_close(lp[:, 1:], want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent[:, 1:], H, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_bf16_logits_are_capped_and_divided_in_float32(built, family):
    """A bf16 model: the soft-cap and the temperature act on float32 logits, as sampling divides float32
    logits. Dividing the bf16 logits first (then upcasting) moved log-probs by up to 0.15-0.32 nats here."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built[family], dtype=torch.bfloat16)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # logits of tens: bf16 keeps 8 bits of mantissa
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
        logits = F.linear(hidden, model.get_output_embeddings().weight).float()     # (N, V) the same bf16 matmul
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, 1:].reshape(-1, 1)).squeeze(-1)
        got = token_logprobs(model, ids, temperature=0.7, chunk_size=4096)[:, 1:].reshape(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_equal_rewards_get_exactly_zero_advantage_whatever_eps():
    """Three copies of 0.1 have a float mean of 0.10000000000000002: without the explicit equality
    check, eps = 0 would turn that rounding into unit advantages."""
    r = torch.tensor([[0.1, 1.0], [0.1, 2.0], [0.1, 4.0]], dtype=torch.float64)
    A = per_position_advantages(r, torch.ones(3, 2, dtype=torch.bool), group_size=3, eps=0.0)
    assert (A[:, 0] == 0).all() and (A[:, 1] != 0).all()
