"""trl_cme.py: CME-GRPO inside TRL's GRPOTrainer, checked against this project's own functions.

Skips without TRL (`pip install -r requirements-optional.txt` installs the tested version)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REAL_MODELS, ROOT

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl_cme  # noqa: E402  (needs trl)
from grpo import grpo_loss, per_position_advantages  # noqa: E402
from reward import Verifier, load_causal_lm  # noqa: E402

G = 4
PLAIN = ["Say hello.", "What is 中文?"]
CHAT = [[{"role": "user", "content": "Say hello."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write code."}]]


def grpo_config(out, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(out), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=2 * G,
                num_generations=G, max_completion_length=12, max_steps=1, logging_steps=1, save_strategy="no",
                seed=0, learning_rate=1e-3, loss_type="grpo", disable_tqdm=True, temperature=1.0)
    base.update(kw)
    return GRPOConfig(**base)


def dataset(prompts):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p} for p in prompts])


@pytest.fixture(scope="module")
def tiny_verifier(built):
    return Verifier(*load_causal_lm(str(built["gemma3"]), dtype=torch.float32, device="cpu"), token_budget=4096)


@pytest.fixture(scope="module")
def gen_tok(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["bytebpe"])


def as_lists(ids: torch.Tensor, mask: torch.Tensor) -> list:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def one_step(trainer, verifier, tokenizer):
    """One generation batch of CHAT x G through the trainer (seed 0): (TRL's output, the completions'
    ids, the verifier's aligned token rewards (B, T) and their valid mask, computed here directly)."""
    batch = [{"prompt": p} for p in CHAT for _ in range(G)]
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(batch)
    ids = as_lists(out["completion_ids"], out["completion_mask"])
    return (out, ids, *verifier.token_rewards([b["prompt"] for b in batch], tokenizer, ids))


class Recorded(trl_cme.SequenceCME):
    """SequenceCME that keeps what TRL gave it and what it returned."""

    calls: list = []

    def __call__(self, prompts, completions, completion_ids=None, **kw):
        out = super().__call__(prompts, completions, completion_ids, **kw)
        self.calls.append((prompts, completion_ids, out))
        return out


@pytest.mark.parametrize("prompts", [PLAIN, CHAT], ids=["plain", "conversational"])
def test_sequence_cme_reward_is_eq3_inside_grpotrainer(built, gen_tok, tiny_verifier, prompts, tmp_path):
    from trl import GRPOTrainer

    reward = Recorded(tiny_verifier, gen_tok)
    reward.calls = []
    trainer = GRPOTrainer(str(built["qwen2"]), reward_funcs=reward, args=grpo_config(tmp_path),
                          processing_class=gen_tok, train_dataset=dataset(prompts))
    trainer.train()
    (seen, ids, out), = reward.calls
    assert len(ids) == 2 * G and sorted(map(json.dumps, seen)) == sorted(json.dumps(p) for p in prompts for _ in range(G))
    texts = [trl_cme.completion_texts(gen_tok, i) for i in [ids]][0]
    expected = -tiny_verifier.sequence_cme(seen, texts)
    assert out == [None if math.isnan(e) else e for e in expected.tolist()]
    logged = trainer.state.log_history[0]
    assert logged["rewards/cme/mean"] == pytest.approx(sum(x for x in out if x is not None) /
                                                       sum(x is not None for x in out), rel=1e-5)


@pytest.mark.parametrize("loss_type", list(trl_cme.LOSS_TYPES))
def test_token_advantages_and_loss_equal_this_projects(built, gen_tok, tiny_verifier, loss_type, tmp_path):
    """On the same sampled completions: TRL's advantages are grpo.per_position_advantages of the
    verifier's aligned token rewards, and TRL's loss and its gradient are grpo.grpo_loss's."""
    trainer = trl_cme.CMEGRPOTrainer(str(built["qwen2"]), tiny_verifier, args=grpo_config(tmp_path, loss_type=loss_type),
                                     processing_class=gen_tok, train_dataset=dataset(CHAT))
    trainer.model.train()
    out, ids, rewards, valid = one_step(trainer, tiny_verifier, gen_tok)
    mask = out["completion_mask"]
    expected = per_position_advantages(rewards, valid, G)
    T = expected.shape[1]
    assert out["advantages"].shape == out["completion_ids"].shape
    assert torch.equal(out["advantages"][:, :T], expected) and not out["advantages"][:, T:].any()
    assert (expected != 0).sum() > 10  # the test has something to compare

    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, out)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], mask], 1)
    logp, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention, mask.shape[1])
    ours, _ = grpo_loss(logp, logp.detach(), out["advantages"], mask.bool(), clip_eps=0.2,
                        loss_type=trl_cme.LOSS_TYPES[loss_type], max_length=trainer.args.max_completion_length,
                        num_tokens=mask.sum().item())
    ours.backward()
    torch.testing.assert_close(trl_loss, ours, rtol=1e-6, atol=1e-8)
    for p, g in zip(model.parameters(), trl_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in trl_grads)


def test_rkl_advantages_are_the_aligned_verifier_logprob_less_the_policys(built, gen_tok, tiny_verifier, tmp_path):
    """reward="rkl" at temperature 0.7: TRL's advantages are grpo.per_position_advantages of the
    verifier's aligned token rewards less log pi_old(y_t), the oracle's: a plain HF forward, one
    completion at a time, log_softmax(logits / 0.7)."""
    from grpo import floor_unscored

    trainer = trl_cme.CMEGRPOTrainer(str(built["qwen2"]), tiny_verifier, reward="rkl",
                                     args=grpo_config(tmp_path, temperature=0.7), processing_class=gen_tok,
                                     train_dataset=dataset(CHAT))
    out, ids, rewards, valid = one_step(trainer, tiny_verifier, gen_tok)
    own = torch.zeros_like(rewards)
    for b, row in enumerate(ids):  # the oracle
        prompt = out["prompt_ids"][b][out["prompt_mask"][b].bool()].tolist()
        x = torch.tensor([prompt + row])
        with torch.no_grad():
            logits = trainer.model(x).logits[0].double() / 0.7
        n = min(len(row), own.shape[1])
        own[b, :n] = torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) - 1 + n].gather(1, x[0, len(prompt):len(prompt) + n, None])[:, 0].float()
    present = torch.zeros_like(valid)
    for b, row in enumerate(ids):
        present[b, :len(row)] = True
    r, v = floor_unscored(torch.where(valid, rewards - own, 0.0), valid, present, G, tiny_verifier.uniform_logprob)
    expected = per_position_advantages(r, v, G)
    T = expected.shape[1]
    torch.testing.assert_close(out["advantages"][:, :T], expected, rtol=0, atol=2e-4)
    assert (expected != 0).sum() > 10
    token = per_position_advantages(*floor_unscored(rewards, valid, present, G, tiny_verifier.uniform_logprob), G)
    assert not torch.allclose(token, expected, atol=1e-2)  # the policy's term changes them
    with pytest.raises(ValueError, match="reward='sequence'"):
        trl_cme.CMEGRPOTrainer(str(built["qwen2"]), tiny_verifier, reward="sequence", args=grpo_config(tmp_path),
                               processing_class=gen_tok, train_dataset=dataset(CHAT))


def test_a_group_split_over_two_processes(built, tmp_path):
    """torchrun, 2 processes, 2 completions each: one prompt's group of 4 lies on both. The advantages
    each process trains on equal those of one process scoring the whole group."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "trl_hooks.py"), str(built["qwen2"]), str(built["bytebpe"]), str(built["gemma3"]), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert all(len(p["ids"]) == 2 for p in parts) and parts[0]["prompts"] == parts[1]["prompts"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["bytebpe"])
    verifier = Verifier(*load_causal_lm(str(built["gemma3"]), dtype=torch.float32, device="cpu"), token_budget=4096)
    ids = parts[0]["ids"] + parts[1]["ids"]
    rewards, valid = verifier.token_rewards(parts[0]["prompts"] * 2, tok, ids)
    expected = per_position_advantages(rewards, valid, G)
    assert (expected != 0).sum() > 10
    for r, part in enumerate(parts):
        got = part["advantages"]
        T = min(got.shape[1], expected.shape[1])
        torch.testing.assert_close(got[:, :T], expected[2 * r:2 * r + 2, :T], rtol=0, atol=1e-4)
        assert not got[:, T:].any() and not expected[2 * r:2 * r + 2, T:].any()


@pytest.mark.skipif(not (REAL_MODELS / "gemma-3-270m").is_dir(), reason="real small models not built")
def test_two_steps_on_the_real_small_models(tmp_path):
    """SmolLM2-135M-Instruct trained by CMEGRPOTrainer with gemma-3-270m as verifier: finite metrics
    at both steps, and the checkpoint loads with from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gen = str(REAL_MODELS / "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(gen)
    verifier = Verifier(*load_causal_lm(str(REAL_MODELS / "gemma-3-270m"), dtype=torch.float32, device="cpu"))
    args = grpo_config(tmp_path, max_steps=2, per_device_train_batch_size=G, max_completion_length=16,
                       save_strategy="steps", save_steps=2, learning_rate=1e-5)
    trainer = trl_cme.CMEGRPOTrainer(gen, verifier, args=args, processing_class=tok, train_dataset=dataset(CHAT))
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        for key in ("loss", "rewards/token_cme/mean", "entropy", "grad_norm"):
            assert math.isfinite(h[key]), (key, h)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    before = AutoModelForCausalLM.from_pretrained(gen)
    changed = [n for (n, p), q in zip(model.named_parameters(), before.parameters()) if not torch.equal(p, q)]
    assert changed


def test_bad_input_is_one_line(built, gen_tok, tiny_verifier, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from align import UnsupportedTokenizerError

    args = grpo_config(tmp_path)
    for loss in ("bnpo", "cispo", "sapo"):
        with pytest.raises(ValueError, match=f"loss_type='{loss}'"):
            trl_cme.CMEGRPOTrainer(str(built["qwen2"]), tiny_verifier, args=grpo_config(tmp_path, loss_type=loss),
                                   processing_class=gen_tok, train_dataset=dataset(PLAIN))
    with pytest.raises(TypeError, match="verifier="):
        trl_cme.CMEGRPOTrainer(str(built["qwen2"]), tiny_verifier, args=args, reward_funcs=[len])

    t = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=t).save_pretrained(tmp_path / "wordpiece")
    wordpiece = Verifier(tiny_verifier.model, AutoTokenizer.from_pretrained(tmp_path / "wordpiece"))
    with pytest.raises(UnsupportedTokenizerError, match="WordPiece"):
        trl_cme.SequenceCME(wordpiece, gen_tok)
    with pytest.raises(UnsupportedTokenizerError, match="WordPiece"):  # at construction: before any step
        trl_cme.CMEGRPOTrainer(str(built["qwen2"]), wordpiece, args=args, processing_class=gen_tok,
                               train_dataset=dataset(PLAIN))

    monkeypatch.setattr(trl, "__version__", "0.19.1")
    with pytest.raises(RuntimeError) as err:
        trl_cme.CMEGRPOTrainer(str(built["qwen2"]), tiny_verifier, args=args, processing_class=gen_tok,
                               train_dataset=dataset(PLAIN))
    assert "\n" not in str(err.value) and "trl 0.19.1 is installed: pip install trl==" in str(err.value)


def test_trl_is_imported_only_by_the_files_that_use_it():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import align, grpo, reward, train, evaluate\n"
            "try:\n    import trl_cme\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"trl_cme.py needs TRL: pip install trl=={trl_cme.TESTED_TRL[-1]}"


def test_compare_trl_runs_both_ways_and_a_rerun_continues(built, tmp_path, monkeypatch):
    import compare_trl

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Tell me about thing {i}."}) + "\n" for i in range(8)))
    kw = dict(gen=str(built["qwen2"]), verifier=str(built["gemma3"]), prompts=str(prompts), out=str(tmp_path / "cmp"),
              seeds=[0], steps=2, reward="token", group_size=2, prompts_per_step=2, max_new_tokens=6, lr=1e-3,
              held_out=2)
    first = compare_trl.run(**kw)
    assert set(first["rewards"]) == {"train.py seed 0", "TRL seed 0"}
    assert all(len(r) == 2 and all(math.isfinite(x) for x in r) for r in first["rewards"].values())
    assert set(first["held_out"]) == {"before", "train.py seed 0", "TRL seed 0"}
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in first["held_out"])
    assert "| 0 | " in report.split("RMS expected from sampling")[1]  # the gap beside sampling's own, per seed
    assert all(len(first["se"][name]) == 2 and min(first["se"][name]) >= 0 for name in first["rewards"])

    def no_training(*a, **k):
        raise AssertionError("a finished stage ran again")
    monkeypatch.setattr(compare_trl, "train", no_training)
    monkeypatch.setattr(compare_trl, "trl_train", no_training)
    assert compare_trl.run(**kw) == first
