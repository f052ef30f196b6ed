"""The paper's setting in miniature, with REAL pretrained models: SmolLM2-135M-Instruct as generator
(Llama architecture, byte-level BPE, ChatML) and gemma-3-270m as verifier (Gemma3, the real 262,144-token
Gemma-3 tokenizer), built offline by ../shared/models/build_real_models.py. Skipped where they are not
built (a user's clone); .ci/run builds them when ../shared/models exists.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, real_model

PROMPTS = ["What is the capital of France?", "Give me two tips for sleeping well.",
           "Write a haiku about rain.", "Explain photosynthesis in one sentence."]


@pytest.fixture(scope="module")
def gemma():
    from reward import load_causal_lm
    model, tok = load_causal_lm(str(real_model("gemma-3-270m")), dtype=torch.float32, device="cpu")
    return model, tok


@pytest.fixture(scope="module")
def smol():
    from sampling import load_generator
    return load_generator(str(real_model("smollm2-135m-instruct")), torch.device("cpu"))


@pytest.fixture(scope="module")
def samples(smol):
    """Real SmolLM2 samples at temperature 1 (odd byte-level pieces occur), EOS kept where it came."""
    import train as T
    model, tok, _, stop = smol
    torch.manual_seed(0)
    rollout = T.generate(model, tok, PROMPTS, T.Config(group_size=2, max_new_tokens=40), stop, torch.device("cpu"))
    return rollout, [rollout.response[b, :int(rollout.mask[b].sum())].numpy() for b in range(len(rollout.prompts))]


def test_sequence_cme_equals_hf_forward_with_labels(gemma, samples):
    from reward import Verifier, encode_pair
    model, tok = gemma
    rollout, _ = samples
    cme = Verifier(model, tok, token_budget=256).sequence_cme(rollout.prompts, rollout.texts)
    for p, r, c in zip(rollout.prompts, rollout.texts, cme):
        vin = encode_pair(tok, p, r)
        ids = torch.tensor([vin.ids])
        labels = torch.full_like(ids, -100)
        labels[0, vin.response] = ids[0, vin.response]
        with torch.no_grad():
            want = model(input_ids=ids, labels=labels).loss.item()
        assert abs(c - want) < 1e-4, (r, c, want)


def test_token_rewards_of_real_samples_keep_the_verifier_total(gemma, smol, samples):
    """Eq. 1 with whitespace masking off sums, per response, to the verifier's total log-likelihood of
    the response (Appendix B's conservation), across the real cross-family tokenizer pair."""
    from reward import Verifier, encode_pair
    model, tok = gemma
    _, gen_tok, _, _ = smol
    rollout, ids = samples
    v = Verifier(model, tok, token_budget=256, mask_whitespace=False)
    rewards, mask = v.token_rewards(rollout.prompts, gen_tok, ids)
    cme = v.sequence_cme(rollout.prompts, rollout.texts)
    n_ver = np.array([len(encode_pair(tok, p, r).response) for p, r in zip(rollout.prompts, rollout.texts)])
    np.testing.assert_allclose(rewards.double().sum(1).numpy(), -cme * n_ver, rtol=1e-5, atol=1e-4)
    for b, i in enumerate(ids):
        if not rollout.truncated[b]:
            assert not mask[b, len(i) - 1]  # the EOS <|im_end|> has no text


def test_real_stop_tokens(smol):
    """gemma-3-270m's shipped generation config names only <eos>; its turn ends with <end_of_turn>."""
    from sampling import load_generator
    _, tok, _, stop = smol
    assert tok.convert_ids_to_tokens(stop) == ["<|im_end|>"]
    _, gtok, shipped, gstop = load_generator(str(real_model("gemma-3-270m")), torch.device("cpu"))
    assert shipped.eos_token_id == 1 and gtok.convert_ids_to_tokens(gstop) == ["<eos>", "<end_of_turn>"]


def test_shared_opening_in_bf16_is_exact(smol):
    """Real SmolLM2 responses sharing a 24-token greedy opening, real gemma-3-270m in bf16, budgets from
    one pair per micro-batch to all in one: rewards at positions whose whole verifier context the
    group shares are identical across members and budgets, their advantages exactly 0. (A pair is
    43-59 verifier tokens here: budget 400 packs 6 pairs per micro-batch, 10**6 all 8.)"""
    from bench_noise import fully_shared, sample_group
    from grpo import per_position_advantages
    from reward import Verifier, load_causal_lm

    model, tok, _, stop = smol
    vmodel, vtok = load_causal_lm(str(real_model("gemma-3-270m")), dtype=torch.bfloat16, device="cpu")
    G, prompts, ids = 4, [], []
    for k, p in enumerate([PROMPTS[1], PROMPTS[3]]):  # answers longer than the opening
        rows, _ = sample_group(model, tok, stop, p, G, 24, 20, seed=k)
        prompts += [p] * G
        ids += rows
    exact = fully_shared(vtok, tok, prompts, ids, G)
    assert exact.sum(1).min() >= 15
    runs = []
    for budget in (1, 400, 10 ** 6):
        rewards, mask = Verifier(vmodel, vtok, token_budget=budget).token_rewards(prompts, tok, ids)
        adv = per_position_advantages(rewards, mask, G)
        assert (adv[exact & mask] == 0).all()
        for g in range(0, len(ids), G):
            r, e = rewards[g:g + G], exact[g]                   # exact is the same row across a group
            assert (r[:, e] == r[:1, e]).all()
        runs.append(rewards)
    for r in runs[1:]:
        assert torch.equal(r[exact], runs[0][exact])


def test_one_cme_grpo_run_through_the_cli(tmp_path):
    """SmolLM2 generator, gemma-3-270m verifier, 2 steps: finite metrics, a checkpoint that reloads."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "run"
    gen, ver = real_model("smollm2-135m-instruct"), real_model("gemma-3-270m")
    args = ["--gen", gen, "--verifier", ver, "--prompts", prompts, "--out", out, "--group-size", 2,
            "--prompts-per-step", 2, "--micro-batch", 4, "--max-new-tokens", 12, "--max-steps", 2, "--lr", 1e-5,
            "--warmup-steps", 1, "--sample-every", 1, "--device", "cpu"]
    r = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert not m["skipped"] and m["cme_mean"] > 0 and 0 <= m["shared_positions"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stop_tokens"] == ["<|im_end|>"] and "You are a helpful AI assistant named SmolLM" in \
        cfg["rendered_first_prompt"]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    before = AutoModelForCausalLM.from_pretrained(gen)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_evaluate_generate_equals_one_prompt_at_a_time_greedy(smol, tmp_path):
    from records import read_jsonl

    model, tok, _, stop = smol
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": p, "index": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "smol.jsonl"
    args = ["generate", "--model", real_model("smollm2-135m-instruct"), "--name", "smol", "--prompts", prompts,
            "--out", out, "--max-new-tokens", 24, "--batch-size", 3, "--device", "cpu"]
    r = subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {row["index"]: row for row in read_jsonl(out)}
    from sampling import chat_prefix
    for i, p in enumerate(PROMPTS):
        x = torch.tensor([tok(chat_prefix(tok, p), add_special_tokens=False).input_ids])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24,
                               eos_token_id=stop, pad_token_id=stop[0])[0, x.shape[1]:].tolist()
        n = next((k for k, t in enumerate(y) if t in stop), len(y))
        assert got[i]["tokens"] == n and got[i]["truncated"] == (n == len(y))
        assert got[i]["output"] == tok.decode(y[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
