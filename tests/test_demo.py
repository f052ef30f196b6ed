"""demo.py: the toy world's ground truth, the demo's claim measured against it, the real-model command."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

import demo
import metrics
from conftest import real_model


# --- the ground truth ---------------------------------------------------------------------------------

def test_every_toy_sentence_is_grammatical_and_on_topic():
    rng = random.Random(0)
    pairs = [demo.toy_pair(rng, s) for s in demo.SUBJECTS for _ in range(20)]
    gt = demo.ground_truth([p for p, _ in pairs], [r for _, r in pairs])
    assert gt["grammatical"] == 1.0 and gt["on_topic"] == 1.0


@pytest.mark.parametrize("response, grammatical, on_topic", [
    ("the cat sees a tree today.", True, True),
    ("the cat sees a tree today. the cat likes the moon.", True, True),
    ("the cat sees a tree today. the dog likes the moon.", True, False),   # a second subject
    ("the dog sees a tree today.", True, False),
    ("the cat sees a tree today", False, True),                            # no full stop
    ("the cat sees a tree today. ", True, True),                           # trailing space only
    ("the cat the cat the cat", False, True),
    ("sees a tree today.", False, False),                                  # no subject at all
    ("the cat sees sees a tree.", False, True),
    ("the cat sees a tree. extra", False, True),
    ("", False, False),
])
def test_ground_truth_judges_single_responses(response, grammatical, on_topic):
    gt = demo.ground_truth(["What does the cat do?"], [response])
    assert gt["grammatical"] == float(grammatical) and gt["on_topic"] == float(on_topic)


def test_distinct_n_counts_repeats_within_a_response():
    words = "a bird bird bird".split()
    assert metrics.distinct(words, 1) == 2 / 4 and metrics.distinct(words, 2) == 2 / 3
    assert math.isnan(metrics.distinct(["one"], 2))
    gt = demo.ground_truth(["Describe a bird, please."] * 2, ["a bird bird bird", "a bird sees the moon."])
    assert gt["distinct_1"] == pytest.approx((2 / 4 + 6 / 6) / 2) and gt["words"] == (4 + 6) / 2  # "." is a word
    assert gt["unique"] == 1.0 and demo.ground_truth(["Describe a bird, please."] * 3, ["a bird", "a bird", "x"])[
        "unique"] == 2 / 3


def test_held_out_prompts_are_never_trained_on_and_cover_every_subject():
    assert not set(demo.HELD_OUT) & set(demo.TRAIN_PROMPTS)
    assert sorted(demo.HELD_OUT + demo.TRAIN_PROMPTS) == sorted(demo.PROMPTS)
    assert {demo.prompt_subject(p) for p in demo.HELD_OUT} == set(demo.SUBJECTS)


# --- the pure-granularity control -----------------------------------------------------------------------

def test_uniform_verifier_costs_log_v_per_token_so_eq1_counts_covered_tokens(built):
    """--verifier-init uniform: every verifier token costs log V, so Eq. 1 at a generator token is
    -log V times the overlap-weighted count of verifier tokens it covers (a pure-granularity reward)."""
    from reward import Verifier, encode_pair, load_causal_lm
    from sampling import load_generator

    vmodel, vtok = load_causal_lm(str(built["gemma3"]), device="cpu", init="uniform", seed=3)
    verifier = Verifier(vmodel, vtok, mask_whitespace=False)
    V = vmodel.get_output_embeddings().weight.shape[0]
    text = "Hello there, 中文 ok"
    pair = encode_pair(vtok, "Say hi", text)
    np.testing.assert_allclose(verifier.logprobs([pair.ids], [pair.response])[0], -math.log(V), rtol=1e-6)

    _, gtok, _, _ = load_generator(str(built["qwen2"]), torch.device("cpu"))
    ids = gtok(text, add_special_tokens=False).input_ids
    rewards, mask = verifier.token_rewards(["Say hi"], gtok, [ids])
    covered = rewards[0, mask[0]].numpy() / -math.log(V)  # verifier tokens covered by each generator token
    assert mask[0].all() and np.all(covered > 0)
    assert covered.sum() == pytest.approx(len(pair.response), rel=1e-5)  # every verifier token counted once
    assert len(set(np.round(covered, 4))) > 1  # the tokenizers differ: granularity varies along the text


# --- the demo's claim, against the ground truth -------------------------------------------------------

def test_demo_raises_the_ground_truth_over_the_base_and_both_controls(tmp_path):
    """The demo's claim at its default settings (seed 0, 160 steps), on 128 held-out samples per row,
    measured by the toy world's grammar, which training never sees: demo.MARGINS, gains of 20 and 35
    points over the base and 50 over each control (over 4 standard errors of a difference; the
    standard error of a share near 50% is 4.4 points at n = 128). They held in all 20 runs of seeds
    0-9 on one thread and on two (docs/demo.md, "Over seeds and threads"; smallest gains 25 and 45
    points, smallest lead over a control 75), so the test asserts what the distribution supports, not
    what one seed happened to give on one machine.
    """
    from train import Config

    r = demo.run_demo(Config(out=str(tmp_path / "demo"), seed=0))
    before, after = r["before"], r["trained"]
    assert after["grammatical"] - before["grammatical"] >= demo.MARGINS["grammatical"]
    assert after["on_topic"] - before["on_topic"] >= demo.MARGINS["on_topic"]
    for control in ("random", "uniform"):
        assert after["grammatical"] - r[control]["grammatical"] >= demo.MARGINS["over_controls"]
        assert after["on_topic"] - r[control]["on_topic"] >= demo.MARGINS["over_controls"]
    assert after["cme"] < before["cme"] - 1.0  # the reward it optimised, on prompts it never saw
    assert len(before["pairs"]) == 128 and (tmp_path / "demo" / "demo.png").stat().st_size > 0
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())  # what `demo.py spread` reads
    assert saved["seed"] == 0 and saved["trained"]["grammatical"] == after["grammatical"]


def test_spread_gives_each_columns_range_and_counts_the_runs_that_meet_the_margins(tmp_path, capsys):
    def run(seed, threads, trained_gramm, random_topic):
        row = {k: 0.5 for k, _, _ in demo.COLUMNS}
        r = {"seed": seed, "threads": threads, "steps": 160, "before": dict(row), "resampled": dict(row),
             "trained": {**row, "grammatical": trained_gramm, "on_topic": 0.9}, "random": {**row, "grammatical": 0.0,
                                                                                        "on_topic": random_topic},
             "uniform": {**row, "grammatical": 0.0, "on_topic": 0.0}}
        path = tmp_path / f"{seed}-{threads}.json"
        path.write_text(json.dumps(r))
        return str(path)
    files = [run(0, 1, 0.9, 0.0), run(0, 2, 0.69, 0.0), run(1, 1, 0.95, 0.5)]
    demo.main(["spread", *files])
    out = capsys.readouterr().out
    assert "3 runs: seeds [0, 1], threads [1, 2]" in out
    assert "after CME-GRPO, trained verifier" in out and "69%-95%" in out
    assert "at least 20% more grammatical than the base: 2 of 3" in out     # 0.69 - 0.5 < 0.20
    assert "at least 35% more on topic than the base: 3 of 3" in out
    assert "more grammatical and on topic than both controls: 2 of 3" in out  # seed 1: 0.9 - 0.5 on topic
    assert "smallest gains over the base: +19% grammatical, +40% on topic; smallest lead over a control: +40%" in out
    with pytest.raises(SystemExit, match="file not found"):
        demo.main(["spread", str(tmp_path / "nope.json")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json: not a demo.json"):
        demo.main(["spread", str(tmp_path / "bad.json")])


# --- the real-model command ------------------------------------------------------------------------------

def test_real_command_runs_on_tiny_models_and_a_rerun_reuses_every_stage(built, tmp_path):
    """`python demo.py real` end to end on the tiny local models (2 steps), then again: nothing retrains."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Say something about the number {i}.\n" for i in range(12)))
    out = tmp_path / "real"
    args = dict(gen=str(built["qwen2"]), verifier=str(built["gemma3"]), prompts=str(prompts), out=str(out),
                held_out=4, steps=2, max_new_tokens=8, lr=1e-3)
    r = demo.run_real(**args)
    for name in ("before", "trained", "random"):
        assert r[name]["truncated"] >= 0 and math.isfinite(r[name]["cme"])
        assert len((out / f"{name}.outputs.jsonl").read_text().splitlines()) == 4
    held = [json.loads(x)["instruction"] for x in (out / "held_out.jsonl").read_text().splitlines()]
    trained_on = [json.loads(x)["instruction"] for x in (out / "train_prompts.jsonl").read_text().splitlines()]
    assert len(held) == 4 and len(trained_on) == 8 and not set(held) & set(trained_on)
    assert [s[0] for s in r["samples"]] == held[:3]
    assert "| after CME-GRPO |" in (out / "report.md").read_text()
    stamp = (out / "trained-verifier" / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns
    again = demo.run_real(**args)
    assert (out / "trained-verifier" / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns == stamp
    same = json.dumps  # NaN (a distinct-2 of one-word outputs) != NaN; its JSON text is equal
    assert same(again["trained"]) == same(r["trained"]) and again["seconds_per_step"] == r["seconds_per_step"]


def test_real_command_refuses_bad_input_in_one_line(tmp_path):
    from conftest import in_process

    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    for args, message in ((["--prompts", str(tmp_path / "nope.txt")], "prompt file not found"),
                          (["--prompts", str(few), "--held-out", "4"], "2 distinct prompts; --held-out 4 needs"),
                          (["--steps", "0"], "--steps 0 is too small"), (["--lr", "-1"], "--lr -1.0 must be"),
                          (["--lr", "inf"], "--lr inf must be a positive number")):
        r = in_process(demo.main, "real", *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_real_command_on_the_real_small_models(tmp_path):
    """Two steps of the documented command on SmolLM2-135M-Instruct + gemma-3-270m (a pipeline check)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Name one fact about the number {i}.\n" for i in range(8)))
    r = demo.run_real(gen=str(real_model("smollm2-135m-instruct")), verifier=str(real_model("gemma-3-270m")),
                      prompts=str(prompts), out=str(tmp_path / "real"), held_out=2, steps=1, group_size=2,
                      prompts_per_step=1, max_new_tokens=12)
    assert all(0 < r[n]["cme"] < 20 for n in ("before", "trained", "random"))
    assert r["seconds_per_step"]["trained"]["step"] > 0
