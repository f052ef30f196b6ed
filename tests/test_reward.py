"""reward.py: verifier inputs, batched scoring, token-level (Eq. 1) and sequence-level (Eq. 3) CME."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align import token_bytes, vocab_bytes
from conftest import real_tokenizer
from reward import PLAIN_TEMPLATE, Verifier, encode_pair, load_causal_lm, prompt_prefix, same_tokenizer

PROMPTS = ["Say hello.", "What is 中文?", "Write code.", "Explain unhappiness.", "Hi", "Emoji please"]
RESPONSES = ["Hello there! How are you?", "\n\n中文 means Chinese; 東京 is Tokyo.",
             "def f(x):\n    return x  # <|im_end|> stays text\n", "The unhappiness of   spaces.",
             " The", "😀👍🏽 e\u0301 done"]


@pytest.fixture(scope="module", params=["gemma3", "llama", "qwen2"])
def verifier(request, built):
    model, tok = load_causal_lm(str(built[request.param]), dtype=torch.float32, device="cpu")
    return Verifier(model, tok, token_budget=4096)


def hf_cme(model, vin) -> float:
    """Eq. 3 the plain Hugging Face way: the mean loss with labels on the response's tokens."""
    ids = torch.tensor([vin.ids])
    labels = torch.full_like(ids, -100)
    labels[0, vin.response] = ids[0, vin.response]
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_sequence_cme_equals_hf_forward_with_labels(verifier):
    cme = verifier.sequence_cme(PROMPTS, RESPONSES)
    for p, r, c in zip(PROMPTS, RESPONSES, cme):
        assert abs(c - hf_cme(verifier.model, encode_pair(verifier.tokenizer, p, r))) < 1e-5


def test_scores_do_not_depend_on_batching(verifier):
    together = verifier.sequence_cme(PROMPTS, RESPONSES)
    alone = [verifier.sequence_cme([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    budget = verifier.token_budget
    try:
        verifier.token_budget = 1  # one pair per micro-batch
        single = verifier.sequence_cme(PROMPTS, RESPONSES)
        verifier.token_budget = 10 ** 6  # everything in one padded batch
        padded = verifier.sequence_cme(PROMPTS, RESPONSES)
    finally:
        verifier.token_budget = budget
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(single, alone, atol=1e-5)
    np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_verifier_is_frozen(verifier):
    assert not verifier.model.training
    assert not any(p.requires_grad for p in verifier.model.parameters())


def test_empty_response_has_nan_cme(verifier):
    assert np.isnan(verifier.sequence_cme(["Hi"], [""])[0])


@pytest.mark.parametrize("gen_name", ["bytebpe", "sp_llama", "sp_gemma"])
def test_token_rewards_preserve_the_verifier_total(verifier, tokenizers, gen_name):
    gen = tokenizers[gen_name]
    if same_tokenizer(gen, verifier.tokenizer):
        pytest.skip("same tokenizer: identity path, see test_identity_fast_path_equals_general_alignment")
    ids = [gen.encode(r, add_special_tokens=False) + [gen.eos_token_id] for r in RESPONSES]
    texts = [token_bytes(gen, i).decode("utf-8") for i in ids]
    vins = [encode_pair(verifier.tokenizer, p, t) for p, t in zip(PROMPTS, texts)]
    total = -verifier.sequence_cme(PROMPTS, texts) * np.array([len(v.response) for v in vins])
    mask_ws = verifier.mask_whitespace
    try:
        verifier.mask_whitespace = False
        rewards, mask = verifier.token_rewards(PROMPTS, gen, ids)
        verifier.mask_whitespace = True
        paper, paper_mask = verifier.token_rewards(PROMPTS, gen, ids)
    finally:
        verifier.mask_whitespace = mask_ws
    T = max(len(i) for i in ids)
    assert rewards.shape == mask.shape == (len(ids), T) and rewards.dtype == torch.float32
    np.testing.assert_allclose(rewards.sum(1).numpy(), total, rtol=1e-5)  # Eq. 1 sums to Eq. 3's total
    for b, i in enumerate(ids):
        assert not mask[b, len(i) - 1] and not mask[b, len(i):].any()  # EOS and padding are masked
        pieces = [vocab_bytes(gen).pieces[t] for t in i]  # alone, a lone '▁' would be stripped
        ws = torch.tensor([p.decode("utf-8", "replace").isspace() for p in pieces] + [False] * (T - len(i)))
        assert (paper_mask[b] == (mask[b] & ~ws)).all()
        assert torch.equal(paper[b][paper_mask[b]], rewards[b][paper_mask[b]])


def test_identity_fast_path_equals_general_alignment(built, tokenizers):
    model, tok = load_causal_lm(str(built["qwen2"]), dtype=torch.float32, device="cpu")
    v = Verifier(model, tok)
    from transformers import AutoTokenizer

    gen = AutoTokenizer.from_pretrained(built["qwen2"])  # the same tokenizer, loaded separately
    assert gen is not tok and same_tokenizer(gen, tok)
    # the raw byte-level BPE differs: transformers rebuilds a "qwen2" tokenizer with NFC and Qwen's regex
    assert not same_tokenizer(tokenizers["bytebpe"], tok) and not same_tokenizer(gen, tokenizers["sp_gemma"])
    keep = [i for i, r in enumerate(RESPONSES) if not r.startswith("\n")]  # a leading newline would merge
    ids = [tok.encode(RESPONSES[i], add_special_tokens=False) + [tok.eos_token_id] for i in keep]
    prompts = [PROMPTS[i] for i in keep]                                      # with the template's own
    fast = v.token_rewards(prompts, gen, ids)
    v._same[id(gen)] = False  # force the general character-overlap path
    general = v.token_rewards(prompts, gen, ids)
    assert torch.equal(fast[1], general[1])
    torch.testing.assert_close(fast[0], general[0], rtol=1e-5, atol=1e-5)


def test_literal_control_token_text_stays_text(tokenizers):
    tok = tokenizers["bytebpe"]
    backend = tok.backend_tokenizer
    vin = encode_pair(tok, "Say it", "Sure: <|im_end|><|im_start|> done")
    special = vocab_bytes(tok).special
    assert not any(special[vin.ids[i]] for i in vin.response)
    prefix_ids = tok.encode(prompt_prefix(tok, "Say it"), add_special_tokens=False)
    assert [i for i in vin.ids if special[i]] == [i for i in prefix_ids if special[i]]  # template's stay
    assert sum(special[prefix_ids]) == 3
    assert backend.encode_special_tokens is False  # the flag is restored
    assert b"".join(vocab_bytes(tok).pieces[vin.ids[i]] for i in vin.response).endswith(
        b"Sure: <|im_end|><|im_start|> done")


def test_boundary_straddler_counts_with_its_response_part(tokenizers):
    tok = tokenizers["sp_llama"]  # plain template ending in "Assistant: "; "▁The" straddles it
    assert prompt_prefix(tok, "Hi") == "<s>" + PLAIN_TEMPLATE.format(prompt="Hi")
    vin = encode_pair(tok, "Hi", "The dog")
    first = vocab_bytes(tok).pieces[vin.ids[vin.response[0]]]
    assert first == b" The" and vin.spans[0].tolist() == [0, 3]
    assert vocab_bytes(tok).pieces[vin.ids[vin.response[0] - 1]] == b":"


def test_real_tokenizers_locate_the_response_exactly():
    qwen = real_tokenizer("qwen2.5")
    vin = encode_pair(qwen, "Hi", "\nHello <|im_end|>")  # "\n" merges with the template's "\n"
    pieces = [vocab_bytes(qwen).pieces[vin.ids[i]] for i in vin.response]
    assert pieces[0] == b"\n\n" and vin.spans[0].tolist() == [0, 1]
    assert qwen.convert_tokens_to_ids("<|im_end|>") not in [vin.ids[i] for i in vin.response]
    llama3 = real_tokenizer("llama-3.2")
    vin = encode_pair(llama3, "Hi", "  spaced")  # the template trims content; the splice does not
    assert b"".join(vocab_bytes(llama3).pieces[vin.ids[i]] for i in vin.response).endswith(b"  spaced")
    assert vin.ids.count(llama3.convert_tokens_to_ids("<|begin_of_text|>")) == 1  # no doubled BOS


def test_load_errors_and_random_init(built, tmp_path):
    with pytest.raises(ValueError, match="cannot load model") as e:
        load_causal_lm(str(tmp_path / "nope"), device="cpu")
    assert "\n" not in str(e.value)
    a, _ = load_causal_lm(str(built["gemma3"]), device="cpu", init="random", seed=1)
    b, _ = load_causal_lm(str(built["gemma3"]), device="cpu", init="random", seed=1)
    c, _ = load_causal_lm(str(built["gemma3"]), device="cpu")
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and wa.shape == wc.shape


# --- end of turn (train.py --eos-reward) -------------------------------------------------------------

def hf_logprob_of_next(model, ids: list, token: int) -> float:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)[token].item()


def test_end_of_turn_reward_at_eos(verifier, tokenizers):
    """With `ended`, the EOS position of a stopped response gets log p(verifier's turn end | prompt,
    response) from a plain forward; a truncated one gets nothing; every other position is unchanged."""
    from reward import turn_end

    gen = tokenizers["bytebpe"]
    prompts, ended = PROMPTS[:4], [True, False, True, True]
    ids = [gen.encode(r, add_special_tokens=False) + [gen.eos_token_id] for r in RESPONSES[:4]]
    texts = [token_bytes(gen, i).decode("utf-8") for i in ids]
    end = verifier.tokenizer.convert_tokens_to_ids(turn_end(verifier.tokenizer))
    assert turn_end(verifier.tokenizer) in ("<end_of_turn>", "<|im_end|>", "</s>")  # template or plain EOS
    paper, paper_mask = verifier.token_rewards(prompts, gen, ids)
    rewards, mask = verifier.token_rewards(prompts, gen, ids, ended=ended)
    cme = verifier.sequence_cme(prompts, texts, ended=ended)
    for b, (p, t, n) in enumerate(zip(prompts, texts, map(len, ids))):
        vin = encode_pair(verifier.tokenizer, p, t)
        torch.testing.assert_close(rewards[b, :n - 1], paper[b, :n - 1], rtol=1e-6, atol=1e-6)
        assert not paper_mask[b, n - 1] and bool(mask[b, n - 1]) == ended[b]
        if ended[b]:
            want = hf_logprob_of_next(verifier.model, vin.ids, end)
            assert abs(rewards[b, n - 1].item() - want) < 1e-4
            total = -hf_cme(verifier.model, vin) * len(vin.response) + want
            assert abs(cme[b] + total / (len(vin.response) + 1)) < 1e-5  # Eq. 3 with one more token
        else:
            assert rewards[b, n - 1] == 0 and abs(cme[b] - hf_cme(verifier.model, vin)) < 1e-5


# --- shared context: one value, whatever the batching -------------------------------------------------

OPENING = "Sure! Here is a short answer to your question about the weather in the mountains today.\n"
ENDINGS = ["It will rain.", "Expect snow and strong wind later.", "Sunny, 20 degrees.", "No idea, sorry!",
           "Clouds, then some sun in the afternoon, and a cold night.", "Fog."]


def group_ids(gen, opening: str, endings) -> list:
    return [gen.encode(opening + e, add_special_tokens=False) + [gen.eos_token_id] for e in endings]


def noisy_bf16_verifier(built):
    """The tiny Gemma3 in bf16 with batch-shape noise: a forward hook adds an offset of up to 0.01 to
    the hidden states, fixed for a given (rows, length), as a GPU's kernels vary with the batch."""
    model, tok = load_causal_lm(str(built["gemma3"]), dtype=torch.bfloat16, device="cpu")
    model.get_decoder().norm.register_forward_hook(
        lambda module, args, out: out + 0.01 * math.sin(7.3 * out.shape[0] + 1.7 * out.shape[1]))
    return model, tok


@pytest.mark.parametrize("share", [True, False])
def test_shared_opening_gets_identical_rewards_and_zero_advantage(built, tokenizers, share):
    """G responses sharing a 20+ token opening, scored by a bf16 verifier with token budgets from one
    pair per micro-batch to all in one, alone and with another prompt's group as batch companions.

    A tiny model on a CPU computes bit-identical bf16 values whatever the batch, so the verifier gets
    what a GPU's kernels have: numbers that depend on the micro-batch's shape (a forward hook adds an
    offset of up to 0.01 to the hidden states, fixed for a given (rows, length)). Without the rule,
    members then disagree at the opening (asserted, so this test can fail); with it, rewards there are
    bit-identical across members and across every budget, and their advantages exactly 0.
    """
    from grpo import per_position_advantages

    model, tok = noisy_bf16_verifier(built)
    gen = tokenizers["bytebpe"]
    G = len(ENDINGS)
    ids = group_ids(gen, OPENING, ENDINGS)
    lcp = next(t for t in range(min(map(len, ids))) if len({r[t] for r in ids}) > 1)
    shared = slice(0, lcp - 2)  # the opening minus its last tokens, whose verifier tokens may reach past it
    assert lcp - 2 >= 20
    other = group_ids(gen, "Well, ", ["yes.", "no, not at all today.", "maybe", "It depends on many things.",
                                      "Ask again later.", "Certainly!"])
    runs = []
    for budget in (1, 40, 200, 10 ** 6):
        for companions in (False, True):
            prompts = ["What is the weather?"] * G + (["Will it work?"] * G if companions else [])
            v = Verifier(model, tok, token_budget=budget, share_context=share)
            rewards, mask = v.token_rewards(prompts, gen, ids + (other if companions else []))
            adv = per_position_advantages(rewards, mask, G)
            runs.append((rewards[:G], mask[:G], adv[:G]))
    for rewards, mask, adv in runs:
        assert (mask[:, shared] == mask[:1, shared]).all() and mask[0, shared].sum() >= 15  # whitespace masked
        assert torch.equal(mask, runs[0][1])
        torch.testing.assert_close(rewards, runs[0][0], rtol=0, atol=1.0)  # what the injected noise can do
        if share:
            assert (rewards[:, shared] == rewards[:1, shared]).all()        # one value for all members
            assert torch.equal(rewards[:, shared], runs[0][0][:, shared])   # whatever the batching
            assert (adv[:, shared] == 0).all()
    if not share:  # the noise is real here: members disagree, and advantages at the opening are not 0
        assert any(not (r[:, shared] == r[:1, shared]).all() for r, _, _ in runs)
        assert any((a[:, shared] != 0).any() for _, _, a in runs)


def test_rows_of_a_split_group_get_the_values_of_the_whole_call(built, tokenizers):
    """TRL can split a prompt's group across processes (trl_cme.py): each process scores its own rows
    with the whole batch as context. Under the batch-shape noise of the test above, a row's values at
    the shared opening are then bit-identical to those of one call scoring every row; scored without
    the context (each process alone), a one-member part has nothing to share and disagrees."""
    model, tok = noisy_bf16_verifier(built)
    gen = tokenizers["bytebpe"]
    G = len(ENDINGS)
    ids = group_ids(gen, OPENING, ENDINGS)
    prompts = ["What is the weather?"] * G
    lcp = next(t for t in range(min(map(len, ids))) if len({r[t] for r in ids}) > 1)
    shared = slice(0, lcp - 2)
    v = Verifier(model, tok, token_budget=200)
    full, full_mask = v.token_rewards(prompts, gen, ids)
    for rows in ([0], [1, 2, 3, 4, 5], [5, 2]):
        r, m = v.token_rewards(prompts, gen, ids, rows=rows)
        assert r.shape == (len(rows), max(len(ids[b]) for b in rows))
        assert torch.equal(m, full_mask[rows, :r.shape[1]]) and not full_mask[rows, r.shape[1]:].any()
        assert torch.equal(r[:, shared], full[rows, shared])
    cme = v.sequence_cme(prompts, [OPENING + e for e in ENDINGS])
    np.testing.assert_array_equal(v.sequence_cme(prompts, [OPENING + e for e in ENDINGS], rows=[4, 1]), cme[[4, 1]])
    alone, _ = v.token_rewards(prompts[:1], gen, ids[:1])
    assert not torch.equal(alone[0, shared], full[0, shared])


def test_a_conversation_prompt_renders_like_its_user_message(tokenizers):
    for name in ("sp_gemma", "sp_llama", "bytebpe"):  # chat templates, and none (PLAIN_TEMPLATE)
        tok = tokenizers[name]
        assert prompt_prefix(tok, [{"role": "user", "content": "Hi there"}]) == prompt_prefix(tok, "Hi there")
        talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a colour."}]
        prefix = prompt_prefix(tok, talk)
        assert prefix.index("Hi") < prefix.index("Hello!") < prefix.index("Name a colour.")
        vin = encode_pair(tok, talk, "Blue.")
        assert token_bytes(tok, [vin.ids[i] for i in vin.response]).endswith(b"Blue.")


def test_the_verifier_template_is_rendered_once_per_prompt(tokenizers, monkeypatch):
    from reward import encode_pairs

    tok = tokenizers["sp_gemma"]
    calls = []
    real = type(tok).apply_chat_template

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)
    monkeypatch.setattr(type(tok), "apply_chat_template", counted)
    prompts = ["Say hello.", "Write code."] * 8                       # two groups of G = 8
    responses = [f"answer {i}" for i in range(16)]
    got = encode_pairs(tok, prompts, responses)
    assert len(calls) == 2
    monkeypatch.setattr(type(tok), "apply_chat_template", real)
    assert [(v.ids, v.response.tolist(), v.spans.tolist()) for v in got] == \
        [(v.ids, v.response.tolist(), v.spans.tolist()) for v in (encode_pair(tok, p, r) for p, r in zip(prompts, responses))]
