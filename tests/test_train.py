"""train.py: the CLI end to end on tiny local models, resume, bad input, sampling."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT, in_process

import metrics as M
import sampling as S
import train as T


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = ["Say hello.", "What is 中文?", "Count to three.", "Name a colour.", "Say hello.", "Write a haiku."]
    path.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in rows))
    return path


def cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """train.py as a command: a new interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def run(*args) -> subprocess.CompletedProcess:
    """train.py's main in this process (tests that are not about the command line itself)."""
    return in_process(T.main, *args)


def tiny_run_args(built, prompts_file, out, *extra):
    return ["--gen", built["qwen2"], "--verifier", built["gemma3"], "--prompts", prompts_file, "--out", out,
            "--group-size", 4, "--prompts-per-step", 2, "--micro-batch", 3, "--max-new-tokens", 10,
            "--lr", 1e-3, "--warmup-steps", 1, "--sample-every", 1, "--device", "cpu", "--epochs", 3, *extra]


METRIC_KEYS = {"step", "reward_mean", "reward_std", "cme_mean", "cme_std", "zero_spread_groups", "len_mean",
               "len_max", "truncated", "loss", "grad_norm", "skipped", "clip_frac", "ratio_mean", "lr",
               "tokens_per_s", "time_gen", "time_score", "time_update", "step_time"}


def test_two_step_smoke_run_through_the_cli(built, prompts_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = cli(*tiny_run_args(built, prompts_file, out, "--max-steps", 2))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert METRIC_KEYS <= m.keys()
        assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, float)), m
        assert not m["skipped"] and m["ratio_mean"] == pytest.approx(1.0)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and len(samples[0]["tokens"]) == len(samples[0]["surprise"])
    assert (out / "curves.png").stat().st_size > 0 and json.loads((out / "config.json").read_text())["lr"] == 1e-3
    before = AutoModelForCausalLM.from_pretrained(built["qwen2"])
    after = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")  # the final checkpoint reloads
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert all(changed)
    assert (out / "checkpoint-2" / "model.safetensors").exists()
    assert not list(out.glob(".tmp-*"))


def test_resume_continues_exactly(built, prompts_file, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(*tiny_run_args(built, prompts_file, whole, "--max-steps", 3)).returncode == 0
    assert run(*tiny_run_args(built, prompts_file, parts, "--max-steps", 2)).returncode == 0
    r = run(*tiny_run_args(built, prompts_file, parts, "--max-steps", 3, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3]
    for k in METRIC_KEYS - {"tokens_per_s", "time_gen", "time_score", "time_update", "step_time"}:
        assert a[2][k] == pytest.approx(b[2][k], rel=1e-5, abs=1e-7), k


def test_resume_refuses_changed_data_settings(built, prompts_file, tmp_path):
    assert run(*tiny_run_args(built, prompts_file, tmp_path, "--max-steps", 1)).returncode == 0
    r = run(*tiny_run_args(built, prompts_file, tmp_path, "--resume", "--seed", 5))
    assert r.returncode == 2 and "--seed was 0 in the checkpoint" in r.stderr


@pytest.mark.parametrize("case,expect", [
    ("unknown model", "cannot load model"),
    ("missing prompts", "prompt file not found"),
    ("malformed line", "prompts.jsonl:2: not valid JSON"),
    ("missing field", "prompts.jsonl:1: expected a string or an object with a string 'instruction' field"),
    ("empty prompts", "no prompts left"),
    ("group of one", "--group-size 1: GRPO needs at least 2"),
    ("too few prompts", "cannot fill one step"),
])
def test_bad_input_gets_one_line_and_exit_2(built, prompts_file, tmp_path, case, expect):
    args = tiny_run_args(built, prompts_file, tmp_path / "out")
    bad = tmp_path / "prompts.jsonl"
    if case == "unknown model":
        args[1] = tmp_path / "no-such-model"
    elif case == "missing prompts":
        args[5] = tmp_path / "nope.jsonl"
    elif case == "malformed line":
        bad.write_text('{"instruction": "ok"}\n{"instruction": \n')
        args[5] = bad
    elif case == "missing field":
        bad.write_text('{"prompt_text": "ok"}\n')
        args[5] = bad
    elif case == "empty prompts":
        bad.write_text('"   "\n""\n')
        args[5] = bad
    elif case == "group of one":
        args += ["--group-size", 1]
    elif case == "too few prompts":
        args += ["--num-prompts", 1]
    r = run(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and expect in r.stderr, r.stderr


def test_out_of_memory_names_the_flag_that_helps(monkeypatch, capsys):
    def oom(cfg, on_step=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(T, "train", oom)
    assert T.main(["--micro-batch", "8"]) == 3
    assert "--micro-batch 4" in capsys.readouterr().err


def test_non_finite_loss_skips_the_step(built, prompts_file):
    cfg = T.Config(gen=str(built["qwen2"]), group_size=2, max_new_tokens=6, micro_batch=2, device="cpu")
    model, tok, _, eos = S.load_generator(cfg.gen, torch.device("cpu"))
    rollout = T.generate(model, tok, ["Hi", "Yo"], cfg, eos, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    adv = torch.ones(4, rollout.response.shape[1])
    adv[1, 0] = float("nan")
    m = T.policy_update(model, None, opt, sched, rollout, adv, cfg, torch.device("cpu"))
    assert m["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    m = T.policy_update(model, None, opt, sched, rollout, torch.ones_like(adv), cfg, torch.device("cpu"))
    assert not m["skipped"] and all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_sampling_defaults_never_reach_rollouts(built, tmp_path):
    """An instruct-style generation_config (temperature 0.7, top-k 20, ...) must not change sampling."""
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path / "instruct"
    shutil.copytree(built["qwen2"], folder)
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                     min_p=0.1).save_pretrained(folder)
    model, tok, shipped, eos = S.load_generator(str(folder), torch.device("cpu"))
    assert shipped.temperature == 0.7
    cfg = T.Config(max_new_tokens=8)
    x = torch.tensor([tok(S.chat_prefix(tok, "Hi"), add_special_tokens=False).input_ids])
    out = model.generate(input_ids=x, generation_config=S.sampling_config(eos, tok.pad_token_id, cfg.temperature, cfg.top_p,
                                                                   cfg.max_new_tokens),
                         output_scores=True, output_logits=True, return_dict_in_generate=True)
    for scores, logits in zip(out.scores, out.logits):  # what sampling used == the raw distribution
        torch.testing.assert_close(torch.log_softmax(scores, -1), torch.log_softmax(logits, -1))


def test_prompt_files_and_local_datasets(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a\nb\n\n a \nc\n")
    cfg = T.Config(prompts=str(txt), num_prompts=10, prompts_per_step=1)
    assert sorted(T.load_prompts(cfg)) == ["a", "b", "c"]  # deduplicated after stripping
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"instruction": f"q{i}"} for i in range(50)]))
    cfg = T.Config(prompts=str(js), num_prompts=20, prompts_per_step=1, seed=3)
    first = T.load_prompts(cfg)
    assert len(first) == 20 and first == T.load_prompts(cfg) and first != T.load_prompts(T.Config(
        prompts=str(js), num_prompts=20, prompts_per_step=1, seed=4))
    hub_like = tmp_path / "dataset"  # a dataset folder takes the same `datasets.load_dataset` path as a hub id
    (hub_like / "data").mkdir(parents=True)
    (hub_like / "data" / "train.jsonl").write_text("".join(json.dumps({"instruction": f"d{i}", "x": 1}) + "\n"
                                                          for i in range(5)))
    assert sorted(T.load_prompts(T.Config(prompts=str(hub_like), prompts_per_step=1))) == [f"d{i}" for i in range(5)]


def test_lr_schedule_warms_up_then_decays():
    f = T.lr_schedule(T.Config(warmup_steps=4), total_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])  # Ctrl-C, and what a scheduler sends before a kill
def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(built, prompts_file, tmp_path, sig):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, tiny_run_args(built, prompts_file, out,
                                                                                "--epochs", 500))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)  # the run has 500 epochs: it is still going when the signal comes, however late
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    done = metrics.read_text().count("\n")
    assert (out / f"checkpoint-{done}").is_dir() and "continue with --resume" in err
    r = run(*tiny_run_args(built, prompts_file, out, "--epochs", 500, "--resume", "--max-steps", done + 1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, done + 2))


@pytest.mark.parametrize("reward", ["token", "sequence", "rent"])
def test_rewards_fit_the_rollout_when_every_response_ends_early(built, reward):
    from reward import Verifier, load_causal_lm

    cfg = T.Config(group_size=2, micro_batch=3, reward=reward)
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    vmodel, vtok = load_causal_lm(str(built["gemma3"]), device="cpu")
    width = 9  # generated width; every response ended with EOS well before it
    ids = [tok.encode(t, add_special_tokens=False)[:4] + [eos[0]] for t in ("Hello there", "Hi", "Yes sir", "No")]
    response = torch.full((4, width), tok.pad_token_id)
    mask = torch.zeros(4, width, dtype=torch.bool)
    for b, r in enumerate(ids):
        response[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), True
    prompts = ["Say hi", "Say hi", "Answer", "Answer"]
    rollout = S.Rollout(prompts, [tok(S.chat_prefix(tok, p), add_special_tokens=False).input_ids for p in prompts],
                        response, mask, torch.zeros(4, dtype=torch.bool),
                        [tok.decode(r, skip_special_tokens=True) for r in ids])
    adv, per_response, cme, token_rewards = T.score(rollout, cfg, Verifier(vmodel, vtok), tok, model,
                                                     torch.device("cpu"))
    assert adv.shape in ((4, width), (4,)) and torch.isfinite(adv).all()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    m = T.policy_update(model, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), rollout, adv,
                        cfg, torch.device("cpu"))
    assert not m["skipped"]


# --- the real setting: log-probs, stop tokens, temperature, reference model, system prompt -----------

def test_policy_logprobs_equal_one_row_at_a_time(built):
    """Unequal prompt and response lengths in one micro-batch; the row with the longest total length has
    a shorter response than another row, so its last token sits at the batch's last position (the old
    clamp-then-scatter wrote a False over it). Temperature 0.7: log-probs of softmax(logits / 0.7)."""
    cfg = T.Config(temperature=0.7)
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    prompts = ["A much longer prompt than the others, with many words in it", "Hi", "Mid-size prompt", "x"]
    lengths = [3, 9, 5, 1]
    words = tok.encode(" the quick brown fox jumps over a lazy dog again", add_special_tokens=False)
    response = torch.full((4, max(lengths)), tok.pad_token_id)
    mask = torch.zeros(4, max(lengths), dtype=torch.bool)
    for b, n in enumerate(lengths):
        response[b, :n] = torch.tensor((words * 3)[b:b + n - 1] + [eos[0]])
        mask[b, :n] = True
    prompt_ids = [tok(S.chat_prefix(tok, p), add_special_tokens=False).input_ids for p in prompts]
    rollout = S.Rollout(prompts, prompt_ids, response, mask, torch.zeros(4, dtype=torch.bool), [""] * 4)
    assert len(prompt_ids[0]) + lengths[0] == max(len(p) + n for p, n in zip(prompt_ids, lengths))
    with torch.no_grad():
        got = T.policy_logprobs(model, rollout, slice(0, 4), cfg, torch.device("cpu"))
        for b, n in enumerate(lengths):
            seq = torch.tensor([prompt_ids[b] + response[b, :n].tolist()])
            logits = model(input_ids=seq).logits[0, :-1] / 0.7
            want = torch.log_softmax(logits, -1).gather(-1, seq[0, 1:, None])[-n:, 0]
            torch.testing.assert_close(got[b, :n], want, rtol=1e-5, atol=1e-5)
            assert (got[b, n:] == 0).all()


def _turn_end_differs_from_eos(built, tmp_path):
    """A tiny Qwen2.5-base-like generator: EOS <|endoftext|> (tokenizer and generation config), while its
    ChatML template ends the assistant's turn with <|im_end|>."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    folder = tmp_path / "base-like"
    shutil.copytree(built["qwen2"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    GenerationConfig(eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>")).save_pretrained(folder)
    return folder


def test_rollouts_and_greedy_outputs_stop_at_the_templates_turn_end(built, tmp_path):

    folder = _turn_end_differs_from_eos(built, tmp_path)
    model, tok, shipped, stop = S.load_generator(str(folder), torch.device("cpu"))
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert shipped.eos_token_id == endoftext and stop == [endoftext, im_end]
    head = torch.nn.Linear(model.config.hidden_size, model.lm_head.out_features)  # always says <|im_end|>
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()[im_end] = 50.0
    model.lm_head = head
    rollout = T.generate(model, tok, ["Hi"], T.Config(group_size=2, max_new_tokens=6), stop, torch.device("cpu"))
    assert rollout.mask.sum(1).tolist() == [1, 1] and not rollout.truncated.any()  # the turn ended at once
    assert rollout.response[:, 0].tolist() == [im_end, im_end] and rollout.texts == ["", ""]
    [[out]] = list(S.greedy_generate(model, tok, ["Hi"], 6, stop))
    assert out["tokens"] == 0 and not out["truncated"] and out["output"] == ""


@pytest.mark.parametrize("name,eos,turn", [("qwen2.5", "<|endoftext|>", "<|im_end|>"),
                                           ("gemma-3", "<eos>", "<end_of_turn>"),
                                           ("llama-3.2", "<|end_of_text|>", "<|eot_id|>"),
                                           ("smollm2", "<|im_end|>", "<|im_end|>")])
def test_stop_tokens_of_real_tokenizers(name, eos, turn):
    """Each base model's generation config names only its EOS; the template's turn end is added."""
    from transformers import GenerationConfig

    from conftest import real_tokenizer

    tok = real_tokenizer(name)
    stop = S.stop_token_ids(tok, GenerationConfig(eos_token_id=tok.convert_tokens_to_ids(eos)))
    assert stop[0] == tok.convert_tokens_to_ids(eos) and tok.convert_tokens_to_ids(turn) in stop
    from align import vocab_bytes
    assert len(stop) == len(set(stop)) and vocab_bytes(tok).special[stop].all()  # control tokens: no text


def test_reference_model_gives_zero_kl_before_the_first_update(built, prompts_file, tmp_path, monkeypatch):
    """KL = 0 at step 1, and the reference is loaded exactly like the policy: on a GPU the old default
    (dtype None: bf16 there, against the policy's fp32 weights under bf16 autocast) made KL > 0 before
    any update, which this CPU cannot show, so the loads are recorded (the real function still runs)."""
    loads = []
    real_load = S.load_causal_lm

    def spy(name, dtype=None, **kw):
        loads.append((str(name), dtype))
        return real_load(name, dtype=dtype, **kw)
    monkeypatch.setattr(S, "load_causal_lm", spy)
    cfg = T.Config(gen=str(built["qwen2"]), verifier=str(built["gemma3"]), prompts=str(prompts_file),
                   out=str(tmp_path / "run"), group_size=2, prompts_per_step=2, micro_batch=3, max_new_tokens=6,
                   beta=0.1, max_steps=2, lr=1e-2, warmup_steps=1, temperature=0.8, device="cpu", sample_every=0)
    history = T.train(cfg)
    assert history[0]["kl"] == 0.0 and history[1]["kl"] > 0  # the policy equals the reference until it moves
    generator_loads = [dtype for name, dtype in loads if name == cfg.gen]
    assert generator_loads == [torch.float32, torch.float32]  # policy, then reference: the same way


def test_shared_positions_metric_counts_the_common_opening():
    response = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [1, 2, 3, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rollout = S.Rollout(["a"] * 4, [[0]] * 4, response, mask, torch.zeros(4, dtype=torch.bool), [""] * 4)
    assert M.shared_share(rollout, 2) == (2 * 2 + 2 * 3) / 14  # group 1 shares 2 tokens, group 2 shares 3


@given(st.lists(st.integers(0, 3), max_size=30), st.integers(1, 4))
def test_repeated_share_counts_ngrams_seen_earlier_in_the_response(ids, n):
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    got = M.repeated_share(ids, n)
    if not grams:
        assert math.isnan(got)
    else:
        assert got == sum(g in grams[:i] for i, g in enumerate(grams)) / len(grams)


def test_collapse_measures_of_a_step_and_their_union_over_ranks():
    import zlib

    texts = ["the cat sat", "the cat sat", "ka ka ka ka ka ka", "ok"]
    response = torch.tensor([[1, 2, 3, 0, 0, 0], [1, 2, 3, 0, 0, 0], [4, 4, 4, 4, 4, 4], [5, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]).bool()
    rollout = S.Rollout(["p"] * 2 + ["q"] * 2, [[0]] * 4, response, mask, torch.tensor([False, False, True, False]),
                        texts)
    adv, reward = torch.tensor([0.0, 0.0, 1.0, -1.0]), np.array([1.0, 1.0, 2.0, 0.0])
    whole = M.step_metrics([M.step_record(rollout, adv, reward, None, 2, (0, 1, 2, 3), max_new_tokens=8)])
    assert whole["identical_groups"] == 0.5                        # group 1's two responses are the same
    assert whole["distinct_1"] == pytest.approx((1 + 1 + 1 / 6 + 1) / 4)
    assert whole["distinct_2"] == pytest.approx((1 + 1 + 1 / 5) / 3)  # "ok" has no bigram: left out
    assert whole["repeated_4gram"] == pytest.approx(2 / 3)          # only the loop has 4 tokens: 2 of 3 seen
    ratios = [len(zlib.compress(x.encode(), 9)) / len(x.encode()) for x in texts]
    assert whole["compression"] == pytest.approx(np.mean(ratios))
    assert whole["len_to_limit"] == pytest.approx((3 + 3 + 6 + 1) / 4 / 8)
    # EOS has no bytes: a response that stopped has one token fewer ("ok" has none left), a cut one does not
    assert whole["bytes_per_token"] == pytest.approx((11 / 2 + 11 / 2 + 17 / 6) / 3)
    ranks = [M.step_record(S.Rollout(rollout.prompts[i:i + 2], rollout.prompt_ids[i:i + 2], response[i:i + 2],
                                     mask[i:i + 2], rollout.truncated[i:i + 2], texts[i:i + 2]),
                           adv[i:i + 2], reward[i:i + 2], None, 2, (0, 1, 2, 3), max_new_tokens=8) for i in (0, 2)]
    split = M.step_metrics(ranks)                                   # two ranks, one group each
    for k in M.COLLAPSE_KEYS:
        assert split[k] == pytest.approx(whole[k]), k


COLLAPSE_DATA = ROOT / "tests" / "data" / "collapse"


@pytest.mark.parametrize("run,fires,kind", [("laptop", 32, "repetition"), ("random-verifier", 28, "invented words"),
                                           ("appendix-e-lr", None, None)])
def test_collapse_rule_on_the_measured_real_model_runs(run, fires, kind):
    """The metrics lines of three 40-step runs of the real SmolLM2-135M-Instruct with gemma-3-270m
    (docs/real-models.md, "Collapse"): the laptop run and its random-verifier control collapse, Appendix E's lr does not."""
    rows = [json.loads(x) for x in (COLLAPSE_DATA / f"{run}.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    watch = M.CollapseWatch()
    said = [w for w in map(watch.update, rows) if w is not None]
    assert watch.fired == fires and len(said) == int(fires is not None)
    if fires:
        assert said[0].startswith(f"warning: the rollouts are collapsing into {kind} at step {watch.fired}:")


def test_collapse_watch_says_it_once_and_a_primed_watch_agrees():
    rows = [{"step": s, "repeated_4gram": 0.01 if s < 12 else 0.3, "compression": 0.6} for s in range(1, 30)]
    watch = M.CollapseWatch()
    said = [(r["step"], w) for r in rows if (w := watch.update(r)) is not None]
    # step 12's window holds one 0.3 among four 0.01: a mean of 0.068, 0.058 over the baseline's 0.01
    assert [s for s, _ in said] == [12]
    primed = M.CollapseWatch()  # a resume after step 8 replays the log, then goes on
    for r in rows[:8]:
        primed.update(r)
    assert [r["step"] for r in rows[8:] if primed.update(r) is not None] == [said[0][0]]


def test_a_collapsing_run_prints_one_warning_line(built, prompts_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M.CollapseWatch, "WINDOW", 1)
    monkeypatch.setattr(M.CollapseWatch, "REPEATS_UP", -1.0)  # every run "collapses" at its second step
    cfg = T.Config(gen=str(built["qwen2"]), verifier=str(built["gemma3"]), prompts=str(prompts_file),
                   out=str(tmp_path / "run"), group_size=2, prompts_per_step=2, micro_batch=4, max_new_tokens=5,
                   max_steps=3, warmup_steps=1, device="cpu", sample_every=0)
    T.train(cfg)
    said = [x for x in capsys.readouterr().err.splitlines() if "collapsing" in x]
    assert len(said) == 1 and said[0].startswith("warning: the rollouts are collapsing into repetition at step 2:")


def test_system_prompt_default_text_and_none():
    from conftest import real_tokenizer

    qwen = real_tokenizer("qwen2.5")
    assert "You are Qwen, created by Alibaba Cloud" in S.chat_prefix(qwen, "Hi")  # the template's default
    assert S.chat_prefix(qwen, "Hi", "") == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                             "<|im_start|>assistant\n")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in S.chat_prefix(qwen, "Hi", "Be brief.")
    gemma = real_tokenizer("gemma-3")  # no default system prompt: "" changes nothing
    assert S.chat_prefix(gemma, "Hi", "") == S.chat_prefix(gemma, "Hi") == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert S.chat_prefix(gemma, "Hi", "Be brief.").startswith("<bos><start_of_turn>user\nBe brief.\n\nHi")


def test_system_prompt_reaches_the_rollout_and_config_json(built, prompts_file, tmp_path):
    out = tmp_path / "run"
    r = run(*tiny_run_args(built, prompts_file, out, "--max-steps", 1, "--system-prompt", "Answer in one word."))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["system_prompt"] == "Answer in one word."
    assert cfg["rendered_first_prompt"].startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n")
    assert cfg["stop_tokens"] == ["<|im_end|>"]


def test_eos_reward_scores_the_end_of_stopped_responses_only(built):
    from reward import Verifier, load_causal_lm

    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    vmodel, vtok = load_causal_lm(str(built["gemma3"]), device="cpu")
    ids = [tok.encode(t, add_special_tokens=False) for t in ("Hello there", "Hi", "Yes sir", "No")]
    ids = [r + [eos[0]] for r in ids[:3]] + [ids[3]]  # the last one was cut by the length limit
    response = torch.full((4, 6), tok.pad_token_id)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for b, r in enumerate(ids):
        response[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), True
    prompts = ["Say hi", "Say hi", "Answer", "Answer"]
    rollout = S.Rollout(prompts, [tok(S.chat_prefix(tok, p), add_special_tokens=False).input_ids for p in prompts],
                        response, mask, torch.tensor([False, False, False, True]),
                        [tok.decode(r, skip_special_tokens=True) for r in ids])
    v = Verifier(vmodel, vtok)
    _, paper, _, paper_rewards = T.score(rollout, T.Config(group_size=2), v, tok, model, torch.device("cpu"))
    _, ours, _, rewards = T.score(rollout, T.Config(group_size=2, eos_reward=True), v, tok, model,
                                  torch.device("cpu"))
    for b, r in enumerate(ids):
        n = len(r)
        assert paper_rewards[b, n - 1] == 0 or b == 3
        if b < 3:  # stopped: the EOS position holds log p(<end_of_turn> | ...) < 0, the rest unchanged
            assert rewards[b, n - 1] < 0  # (one more token changes the batch's shape: fp32 rounding only)
            torch.testing.assert_close(rewards[b, :n - 1], paper_rewards[b, :n - 1], rtol=1e-5, atol=1e-5)
        else:      # truncated: nothing added
            torch.testing.assert_close(rewards[b], paper_rewards[b], rtol=1e-5, atol=1e-5)
            assert ours[b] == pytest.approx(paper[b], rel=1e-5)


def test_length_sorted_micro_batches_change_no_number_and_pad_less(built):
    """One update with micro-batches of 3 (longest first) equals one with the whole step at once, and
    the sorted batches hold less padding than rollout order would."""
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    torch.manual_seed(3)
    cfg = T.Config(group_size=3, max_new_tokens=12, micro_batch=3, beta=0.0)
    rollout = T.generate(model, tok, ["Hi", "A longer prompt about the weather", "Count"], cfg, eos,
                         torch.device("cpu"))
    adv = torch.randn(rollout.response.shape) * rollout.mask
    batches = T.micro_batches(rollout, 3)
    assert sorted(b for batch in batches for b in batch) == list(range(9))
    total = torch.tensor([len(p) for p in rollout.prompt_ids]) + rollout.mask.sum(1)

    def padded(groups):
        return sum(len(g) * int(total[g].max()) for g in groups)
    assert padded(batches) <= padded([list(range(i, i + 3)) for i in range(0, 9, 3)])
    for loss_type in ("grpo", "dr_grpo", "token"):  # each normaliser is the whole step's
        weights = []
        for micro in (3, 9):
            m, _, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
            opt = torch.optim.SGD(m.parameters(), lr=1.0)
            T.policy_update(m, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), rollout, adv,
                            T.Config(group_size=3, micro_batch=micro, grad_clip=1e9, loss_type=loss_type),
                            torch.device("cpu"))
            weights.append([p.detach().clone() for p in m.parameters()])
        for a, b in zip(*weights):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mask_truncated_is_the_update_with_the_truncated_responses_given_no_advantage(built):
    """--mask-truncated leaves the cut responses out of Eq. 2's sum but not out of its 1/G: the update
    equals the one where those responses' advantages are 0, and differs from the plain one."""
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    torch.manual_seed(4)
    cfg = T.Config(group_size=4, max_new_tokens=5, micro_batch=4, grad_clip=1e9)
    rollout = T.generate(model, tok, ["Hi", "Count"], cfg, eos, torch.device("cpu"))
    cut = torch.tensor([False, True, False, False, True, True, False, False])  # the tiny model rarely stops:
    rollout = replace(rollout, truncated=cut)                                    # say which were cut
    adv = torch.randn(rollout.response.shape) * rollout.mask
    weights = []
    for flag, a in ((True, adv), (False, adv * ~cut[:, None]), (False, adv)):
        m, _, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        T.policy_update(m, None, opt, None, rollout, a, replace(cfg, mask_truncated=flag), torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-7)
    assert not torch.allclose(weights[0], weights[2])


def test_mask_truncated_with_beta_also_leaves_out_the_kl_of_the_cut_responses(built):
    """With --beta > 0 the cut responses leave both terms of Eq. 2's sum: the update differs from the one
    where only their advantages are 0 (which keeps their KL), as docs/training.md says."""
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    torch.manual_seed(4)
    cfg = T.Config(group_size=4, max_new_tokens=5, micro_batch=4, grad_clip=1e9, beta=0.5)
    rollout = T.generate(model, tok, ["Hi", "Count"], cfg, eos, torch.device("cpu"))
    cut = torch.tensor([False, True, False, False, True, True, False, False])
    rollout = replace(rollout, truncated=cut)
    adv = torch.randn(rollout.response.shape) * rollout.mask
    ref, _, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    with torch.no_grad():  # a reference away from the policy, so the KL term has a gradient
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights = []
    for flag, a in ((True, adv), (False, adv * ~cut[:, None])):
        m, _, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        T.policy_update(m, ref, opt, None, rollout, a, replace(cfg, mask_truncated=flag), torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert not torch.allclose(weights[0], weights[1], rtol=0, atol=1e-6)


def test_num_iterations_reuses_the_rollout_and_the_clip_acts(built, monkeypatch):
    """--num-iterations 2: the first update is the single update of mu = 1 (rho = 1 exactly), the second
    sees rho != 1 and clips; the schedule advances once per step."""
    torch.manual_seed(5)
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    cfg = T.Config(group_size=4, max_new_tokens=8, micro_batch=2, grad_clip=1e9, lr=0.05)
    rollout = T.generate(model, tok, ["Hi", "Count"], cfg, eos, torch.device("cpu"))
    adv = torch.randn(rollout.response.shape) * rollout.mask
    runs = {}
    for mu in (1, 2):
        m, _, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
        opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        seen, real = [], T.policy_update

        def spy(*a, **k):
            out = real(*a, **k)
            seen.append((out, torch.cat([p.detach().flatten() for p in m.parameters()])))
            return out
        with monkeypatch.context() as mp:
            mp.setattr(T, "policy_update", spy)
            runs[mu] = T.update(m, None, opt, sched, rollout, adv, replace(cfg, num_iterations=mu), torch.device("cpu"))
        runs[mu, "seen"], runs[mu, "lr"] = seen, sched.get_last_lr()[0]
    (one, w1), = runs[1, "seen"]
    (first, w_first), (second, _) = runs[2, "seen"]
    assert one["ratio_mean"] == 1.0 and first["ratio_mean"] == 1.0 and first["clip_frac"] == 0.0
    torch.testing.assert_close(w_first, w1, rtol=0, atol=0)
    assert second["ratio_mean"] != 1.0 and second["clip_frac"] > 0
    assert runs[2]["clip_frac_last"] == second["clip_frac"] and runs[2]["clip_frac"] == second["clip_frac"] / 2
    assert runs[1, "lr"] == runs[2, "lr"] == cfg.lr / 2


def test_static_cache_rollouts_equal_the_dynamic_cache(built):
    """--cache static: greedy outputs of a left-padded batch equal the dynamic cache's token for token,
    and so do rollouts sampled from the same seed."""
    from transformers import GenerationConfig

    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    prompts = ["Hi", "A much longer prompt that pads the others", "Count to three"]
    x, attn = S.left_pad([tok(S.chat_prefix(tok, p), add_special_tokens=False).input_ids for p in prompts],
                         tok.pad_token_id, "cpu")
    outs = []
    for cache in (None, "static"):
        g = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                             cache_implementation=cache, disable_compile=True)
        outs.append(model.generate(input_ids=x, attention_mask=attn, generation_config=g))
    assert torch.equal(outs[0], outs[1])
    rollouts = []
    for cache in ("dynamic", "static"):
        torch.manual_seed(0)
        rollouts.append(T.generate(model, tok, prompts, T.Config(group_size=2, max_new_tokens=10, cache=cache),
                                   eos, torch.device("cpu")))
    assert torch.equal(rollouts[0].response, rollouts[1].response) and rollouts[0].texts == rollouts[1].texts


def test_bf16_rollout_copy_follows_the_policy(built, prompts_file, tmp_path):
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    sampler = S.rollout_model(model, T.Config(rollout_dtype="bf16").rollout_dtype)
    assert sampler is not model and all(p.dtype == torch.bfloat16 for p in sampler.parameters())
    assert S.rollout_model(model, T.Config().rollout_dtype) is model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    S.refresh_rollout_model(sampler, model)
    for a, b in zip(sampler.parameters(), model.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16))
    out = tmp_path / "run"
    r = run(*tiny_run_args(built, prompts_file, out, "--max-steps", 2, "--rollout-dtype", "bf16"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_bench_train_prints_the_per_phase_table(capsys):
    import bench_train

    assert bench_train.main(["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6",
                             "--steps", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("generate", "score", "update", "step")}
    assert set(rows) == {"generate", "score", "update", "step"}
    shares = sum(float(rows[p][2].rstrip("%")) for p in ("generate", "score", "update"))
    assert 95 <= shares <= 100.5 and "peak resident memory" in out


def test_the_default_prompt_cap_keeps_one_long_prompt_from_sizing_every_rollout(built):
    """At the defaults a prompt over 512 tokens is skipped, as the authors' code does: left-padded
    with the step's other prompts it would size the KV cache of all G x 16 rollouts (an 8k-token prompt:
    about 15 GiB of cache for Qwen2.5-0.5B; out of memory on 48 GB near 20k)."""
    model, tok, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    long = "word " * 600
    assert len(tok(S.chat_prefix(tok, long)).input_ids) > 512
    kept = T.fit_context(["Say hi.", long, "Count to three."], tok, model, T.Config(prompts_per_step=1,
                                                                                    max_new_tokens=64), verbose=False)
    assert kept == ["Say hi.", "Count to three."]


# --- collapse rules that length alone does not trip; a stalled run; a response with nothing to score ---

def prose() -> str:
    """Plain English: the lines of docs/ that are prose (no tables, code, lists or headings)."""
    import re
    return " ".join(line for p in sorted((ROOT / "docs").glob("*.md")) for line in p.read_text().splitlines()
                    if re.match(r"^[A-Za-z][a-z]* [a-z]+ [a-z]+ ", line) and "`" not in line)


def plain_text_run(tokenizer, sizes, unit: str, group_size: int = 4, groups: int = 2) -> list[dict]:
    """The metrics lines of a run whose rollouts are plain English (`prose`) that only grow or shrink:
    step s holds responses of sizes[s] bytes (unit "bytes") or tokens ("tokens"), each a different
    excerpt, each ended by EOS."""
    words, eos, rows = prose().split(), tokenizer.eos_token_id, []
    for step, size in enumerate(sizes, 1):
        texts = []
        for b in range(group_size * groups):
            start, text = (step * 53 + b * 211) % (len(words) - 400), ""
            for w in words[start:]:
                longer = (text + " " + w).strip()
                n = len(longer.encode()) if unit == "bytes" else len(tokenizer(longer).input_ids)
                if n > size and text:
                    break
                text = longer
            texts.append(text)
        ids = [tokenizer(t).input_ids + [eos] for t in texts]
        T_ = max(map(len, ids))
        response = torch.tensor([x + [0] * (T_ - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (T_ - len(x)) for x in ids]).bool()
        rollout = S.Rollout(["p"] * len(texts), [[0]] * len(texts), response, mask, torch.zeros(len(texts)).bool(),
                            texts)
        rec = M.step_record(rollout, torch.randn(len(texts)), np.zeros(len(texts)), None, group_size, (0, 1, 2, 3), 512)
        rows.append({"step": step, **M.step_metrics([rec])})
    return rows


def test_collapse_rule_is_not_tripped_by_answers_that_only_grow_or_shrink(tmp_path):
    """Plain text whose answers grow from 60 to 500 bytes (zlib's ratio falls with length alone) or
    shrink from 60 tokens to 2 (EOS, which has no bytes, weighs more in a short answer): no warning.
    The tokenizer is a byte-level BPE trained on that text, so its words are whole tokens, as English
    is to a real tokenizer (about 4 bytes per token)."""
    import tiny
    from transformers import AutoTokenizer

    words = prose().split()  # excerpts start at any word: train on pieces that do too
    tok = AutoTokenizer.from_pretrained(tiny.build_bytebpe(tmp_path / "tok", [" ".join(words[i:i + 12])
                                                                                for i in range(len(words))], 4000))
    grow = plain_text_run(tok, np.linspace(60, 500, 20).astype(int), "bytes")
    shrink = plain_text_run(tok, np.r_[[60] * 5, np.linspace(60, 2, 5), [2] * 10].astype(int), "tokens")
    assert grow[-1]["compression"] < 0.7 * grow[0]["compression"]  # what would trip a rule on compression
    for rows in (grow, shrink):
        watch = M.CollapseWatch()
        said = [w for w in map(watch.update, rows) if w is not None]
        assert not said, said


def test_collapse_into_identical_responses_and_a_stall_each_say_so_once():
    rows = [{"step": s, "repeated_4gram": 0.01, "bytes_per_token": 4.0, "identical_groups": 0.0 if s < 11 else 1.0,
             "zero_spread_groups": 0.0 if s < 14 else 1.0} for s in range(1, 25)]
    watch = M.CollapseWatch()
    said = [(r["step"], w) for r in rows if (w := watch.update(r)) is not None]
    # step 13's window holds three 1.0 among five: 0.6 over the baseline's 0
    assert [s for s, _ in said] == [13, 16]
    assert said[0][1].startswith("warning: the rollouts are collapsing into identical responses at step 13:")
    assert said[1][1].startswith("warning: no group has had any reward spread for 3 steps (step 16):")


def test_metrics_lines_are_strict_json_and_read_back_nan(tmp_path):
    m = {"step": 1, "reward_mean": -1.5, "distinct_2": float("nan"), "grad_norm": float("inf"), "skipped": False}
    T.log_step(tmp_path, m, T.Config(sample_every=0), None, None, None, None, None)
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]

    def strict(name):
        raise ValueError(f"{name} is not JSON")
    assert json.loads(line, parse_constant=strict)["distinct_2"] is None
    back, = M.read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(back["distinct_2"]) and math.isnan(back["grad_norm"]) and back["reward_mean"] == -1.5


def floor_oracle(rewards, valid, present, G, default):
    r, v = rewards.clone(), valid.clone()
    for b in range(r.shape[0]):
        if present[b].any() and not valid[b].any():
            g = range(b - b % G, b - b % G + G)
            scored = [float(rewards[i, t]) for i in g for t in range(r.shape[1]) if valid[i, t]]
            for t in range(r.shape[1]):
                if present[b, t]:
                    r[b, t], v[b, t] = (min(scored) if scored else default), True
    return r, v


@given(st.integers(0, 2 ** 31 - 1))
def test_floor_unscored_equals_the_loop(seed):
    from grpo import floor_unscored

    g = torch.Generator().manual_seed(seed)
    B, T_, G = 8, 5, 4
    present = torch.rand(B, T_, generator=g) < 0.8
    valid = present & (torch.rand(B, T_, generator=g) < 0.5) & (torch.rand(B, 1, generator=g) < 0.6)
    rewards = torch.where(valid, -torch.rand(B, T_, generator=g) * 5, 0.0)
    got = floor_unscored(rewards, valid, present, G, -12.0)
    want = floor_oracle(rewards, valid, present, G, -12.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    flat = torch.where(valid[:, 0], rewards[:, 0], torch.nan)  # Eq. 3: NaN where unscored
    r, v = floor_unscored(flat, None, None, G, -12.0)
    want = floor_oracle(rewards[:, :1], valid[:, :1], torch.ones(B, 1).bool(), G, -12.0)
    assert torch.equal(r, want[0][:, 0]) and v.all()


@pytest.mark.parametrize("reward", ["token", "sequence"])
def test_a_response_with_nothing_to_score_gets_its_groups_lowest_reward_never_nan(built, reward):
    """An empty response (no verifier token: Eq. 3's mean is NaN, Eq. 1 has only the masked EOS) gets the
    lowest reward of its group, so its advantage is the group's lowest. Under Eq. 1 whitespace only is
    unscored too (Appendix B masks it): a group of nothing else gets -log V and no spread."""
    from reward import Verifier, load_causal_lm

    _, tok, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    verifier = Verifier(*load_causal_lm(str(built["gemma3"]), device="cpu"))
    texts = ["Hello there.", "", "Count to three.", "A cat.", "  ", "\n\n", "   ", "    "]
    ids = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    T_ = max(map(len, ids))
    rollout = S.Rollout(["Say hi"] * 4 + ["Count"] * 4, [[0]] * 8,
                        torch.tensor([x + [0] * (T_ - len(x)) for x in ids]),
                        torch.tensor([[1] * len(x) + [0] * (T_ - len(x)) for x in ids]).bool(),
                        torch.zeros(8).bool(), texts)
    cfg = T.Config(group_size=4, reward=reward)
    adv, per_response, cme, token_rewards = T.score(rollout, cfg, verifier, tok, None, torch.device("cpu"))
    assert np.isfinite(per_response).all() and np.isfinite(cme).all()
    first = adv[:4] if reward == "sequence" else adv[:4, 0]       # the first position: everyone has one
    assert first[1] == first.min() and first[1] < 0
    if reward == "sequence":
        assert per_response[1] == per_response[[0, 2, 3]].min()
    else:
        assert token_rewards[1, 0] == token_rewards[[0, 2, 3]][token_rewards[[0, 2, 3]] != 0].min()
        assert np.allclose(per_response[4:], verifier.uniform_logprob) and not adv[4:].any()


# --- rkl: Eq. 1 less the policy's own log-probability (reverse KL to the verifier) ----------------------

def test_rkl_with_the_generator_as_its_own_verifier_is_zero_everywhere(built):
    """log p_verifier - log pi_old with verifier = policy (fp32, one tokenizer: the identity alignment)."""
    from reward import Verifier, load_causal_lm

    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    torch.manual_seed(0)
    cfg = T.Config(group_size=4, max_new_tokens=8, micro_batch=3, reward="rkl", mask_whitespace=False)
    rollout = T.generate(model, tok, ["Say hello.", "Count to three."], cfg, eos, torch.device("cpu"))
    verifier = Verifier(*load_causal_lm(str(built["qwen2"]), device="cpu"), mask_whitespace=False)
    adv, per_response, cme, _ = T.score(rollout, cfg, verifier, tok, model, torch.device("cpu"))
    _, _, _, surprise = T.score(rollout, replace(cfg, reward="token"), verifier, tok, model, torch.device("cpu"))
    from align import token_byte_spans

    # a special token sampled inside a response has no text, so the verifier reads the response without
    # it (reward.py, item 4) and the two contexts differ after it: only responses of text are compared
    text = [b for b in range(8) if (np.diff(token_byte_spans(tok, rollout.response[b, :int(rollout.mask[b].sum())]
                                                             .numpy()), axis=1)[:-1] > 0).all()]
    assert len(text) >= 4 and (surprise[text] < -0.1).any()            # the verifier part is not 0 itself
    assert np.abs(per_response[text]).max() < 1e-4


def test_rkl_is_the_aligned_verifier_logprob_less_the_policys_on_a_cross_tokenizer_pair(built):
    from reward import Verifier, load_causal_lm

    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    torch.manual_seed(1)
    cfg = T.Config(group_size=2, max_new_tokens=6, micro_batch=4, reward="rkl", temperature=0.7)
    rollout = T.generate(model, tok, ["Say hello.", "Count to three."], cfg, eos, torch.device("cpu"))
    verifier = Verifier(*load_causal_lm(str(built["gemma3"]), device="cpu"))
    _, _, _, aligned = T.score(rollout, cfg, verifier, tok, model, torch.device("cpu"))
    _, per_response, _, _ = T.score(rollout, cfg, verifier, tok, model, torch.device("cpu"))
    want = []
    for b in range(len(rollout.texts)):  # the oracle: one sequence at a time, a plain forward, logits / T
        n = int(rollout.mask[b].sum())
        ids = torch.tensor([rollout.prompt_ids[b] + rollout.response[b, :n].tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0].double() / cfg.temperature
        P = len(rollout.prompt_ids[b])
        own = torch.log_softmax(logits, -1)[P - 1:P - 1 + n].gather(1, ids[0, P:, None])[:, 0]
        valid = aligned[b, :n] != 0
        r = aligned[b, :n].double() - own
        want.append(float(r[valid].mean()) if valid.any() else math.nan)
    got = per_response[~np.isnan(want)]
    np.testing.assert_allclose(got, np.array(want)[~np.isnan(want)], atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_update(built, lora):
    """--gradient-checkpointing recomputes activations in the backward pass: the weights after an update are
    those without it (fp32, up to rounding), and the switch is the one transformers keeps (no FutureWarning)."""
    import warnings
    if lora:
        pytest.importorskip("peft")
    cfg = T.Config(group_size=4, max_new_tokens=8, micro_batch=2, lr=0.05)

    def policy():
        m = S.load_generator(str(built["qwen2"]), torch.device("cpu"))[0]
        if lora:
            torch.manual_seed(0)  # the adapters' A
            m = T.add_adapters(m, rank=4, alpha=8, dropout=0.0, targets="q_proj,v_proj")
        return m

    def trained(m):
        return torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])

    torch.manual_seed(3)
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    rollout = T.generate(model, tok, ["Hi", "Count"], cfg, eos, torch.device("cpu"))
    adv = torch.randn(rollout.response.shape) * rollout.mask
    start, weights = trained(policy()), {}
    for checkpointed in (False, True):
        m = policy()
        if checkpointed:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)
                T.checkpoint_activations(m, lora=lora)
            base = m.base_model.model if lora else m
            assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        T.update(m, None, opt, sched, rollout, adv, cfg, torch.device("cpu"))
        weights[checkpointed] = trained(m)
    assert not torch.equal(weights[False], start)  # the update moved the weights it compares
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)
