"""quiz.py: the statistics, the premise's agreement, and the fast mode end to end."""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import questions
import quiz


@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=4, max_size=24))
@settings(max_examples=200, deadline=None)
def test_agreement_equals_counting_every_pair(items):
    """quiz.agreement against counting every (right, wrong) pair of each group with itertools."""
    G = 4
    items = items[:len(items) // G * G]
    adv = np.array([a for a, _ in items], dtype=float)
    right = np.array([r for _, r in items])
    wins = pairs = 0.0
    for g in range(0, len(items), G):
        group = list(zip(adv[g:g + G], right[g:g + G]))
        for (a, ra), (b, rb) in itertools.product(group, group):
            if ra and not rb:
                pairs += 1
                wins += (a > b) + 0.5 * (a == b)
    share, n = quiz.agreement(adv, right, G)
    assert n == pairs
    assert (math.isnan(share) and pairs == 0) or share == pytest.approx(wins / pairs)


@given(st.integers(0, 400), st.integers(1, 400))
def test_wilson_interval_holds_the_share_and_mirrors(k, n):
    k = min(k, n)
    low, high = quiz.wilson(k, n)
    assert 0 <= low <= k / n <= high <= 1
    mirror = quiz.wilson(n - k, n)
    assert mirror[0] == pytest.approx(1 - high) and mirror[1] == pytest.approx(1 - low)


def test_wilson_interval_matches_its_formula_written_out():
    # 0 of 10: the upper end is z^2 / (n + z^2) = 3.8416 / 13.8416
    assert quiz.wilson(0, 10) == (pytest.approx(0.0, abs=1e-12), pytest.approx(3.8416 / 13.8416))


def tango_oracle(after, before, z=1.96, grid=2001):
    """Tango's interval the slow way: for each delta on a grid, the constrained maximum-likelihood p21
    found by searching the multinomial log-likelihood itself, then the deltas whose |T| <= z."""
    n = len(after)
    b = sum(1 for x, y in zip(after, before) if x and not y)
    c = sum(1 for x, y in zip(after, before) if y and not x)
    rest = n - b - c
    inside = []
    for delta in np.linspace(-1, 1, grid):
        lo, hi = max(0.0, -delta), (1 - delta) / 2        # p21 >= 0, p12 = p21 + delta >= 0, p11 + p22 >= 0
        if hi < lo:
            continue
        q = np.linspace(lo, hi, 1001)
        with np.errstate(divide="ignore", invalid="ignore"):
            ll = (b * np.log(q + delta) if b else 0) + (c * np.log(q) if c else 0) + \
                 (rest * np.log(1 - 2 * q - delta) if rest else 0)
        ll = np.where(np.isnan(ll), -np.inf, ll)
        q21 = q[int(np.argmax(ll))]
        var = n * (2 * q21 + delta * (1 - delta))
        num = b - c - n * delta
        t = 0.0 if num == 0 and var <= 0 else (num / math.sqrt(var) if var > 0 else math.inf)
        if abs(t) <= z:
            inside.append(delta)
    return min(inside), max(inside)


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
@settings(max_examples=15, deadline=None)
def test_paired_interval_is_tangos_score_interval(pairs):
    after, before = [a for a, _ in pairs], [b for _, b in pairs]
    change, low, high = quiz.paired_interval(after, before)
    assert change == pytest.approx(np.mean(after) - np.mean(before))
    assert -1 <= low <= change <= high <= 1
    want = tango_oracle(after, before)
    assert low == pytest.approx(want[0], abs=2e-3) and high == pytest.approx(want[1], abs=2e-3)


def test_paired_interval_when_nothing_changed_is_an_interval_around_zero():
    same = [True] * 10 + [False] * 10
    change, low, high = quiz.paired_interval(same, same)
    assert change == 0 and low < -0.05 and high > 0.05 and low == pytest.approx(-high)


@given(st.lists(st.floats(0, 1), min_size=3, max_size=60))
@settings(max_examples=100, deadline=None)
def test_curve_slope_and_its_interval_equal_a_written_out_regression(acc):
    first, last, slope, half = quiz.curve([{"accuracy": a} for a in acc], k=10)
    x = np.arange(1, len(acc) + 1)
    b = sum((xi - x.mean()) * (a - np.mean(acc)) for xi, a in zip(x, acc)) / sum((xi - x.mean()) ** 2 for xi in x)
    fitted = [np.mean(acc) + b * (xi - x.mean()) for xi in x]
    s2 = sum((a - f) ** 2 for a, f in zip(acc, fitted)) / (len(acc) - 2)
    assert first == pytest.approx(np.mean(acc[:10])) and last == pytest.approx(np.mean(acc[-10:]))
    assert slope == pytest.approx(b, abs=1e-9)
    assert half == pytest.approx(1.96 * math.sqrt(s2 / sum((xi - x.mean()) ** 2 for xi in x)), abs=1e-9)


def test_fast_mode_interrupted_then_resumed_then_a_rerun_reuses_every_stage_and_the_report_is_its_files(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / "quiz"
    train = quiz.train

    def ctrl_c_at_the_first_step(cfg, on_step):  # a real SIGINT, handled by train() as a user's Ctrl-C is
        def hook(step, rollout):
            os.kill(os.getpid(), signal.SIGINT)
            return on_step(step, rollout)
        return train(cfg, on_step=hook)

    monkeypatch.setattr(quiz, "train", ctrl_c_at_the_first_step)
    assert quiz.main(["--fast", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "quiz.py: interrupted; rerun the same command to continue where it stopped"
    assert [p.name for p in (out / "eq1").glob("checkpoint-*")] == ["checkpoint-1"]
    monkeypatch.setattr(quiz, "train", train)
    assert quiz.main(["--fast", "--out", str(out)]) == 0  # resumes eq1 after its step 1, then the rest
    assert f"resumed from {out / 'eq1' / 'checkpoint-1'} after step 1" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["premise"]) == set(quiz.FAMILIES) and report["kept"] == list(quiz.FAMILIES)
    assert set(report["results"]) == {"before", "eq1", "eq3", "rkl", "random", "self"}
    n = report["results"]["before"]["n"]
    assert n == sum(round(0.4 * 5) for _ in quiz.FAMILIES)
    for name, r in report["results"].items():
        assert r["n"] == n and 0 <= r["accuracy"] <= 1 and r["low"] <= r["accuracy"] <= r["high"]
        assert len((out / f"{name}.answers.jsonl").read_text().splitlines()) == n
    for name in ("eq1", "eq3", "rkl", "random", "self"):
        metrics = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and all(0 <= m["accuracy"] <= 1 for m in metrics)
    config = {name: json.loads((out / name / "config.json").read_text()) for name in ("eq1", "eq3", "random", "self")}
    assert config["eq3"]["reward"] == "sequence" and config["eq1"]["reward"] == "token"
    assert json.loads((out / "rkl" / "config.json").read_text())["reward"] == "rkl"
    assert config["random"]["verifier_init"] == "random" and config["self"]["verifier"] == config["eq1"]["gen"]
    for r in report["premise"].values():
        assert 0 <= r["disc_verifier"] <= 1 and 0 <= r["mixed"] <= 1 and 0 <= r["dodge_self"] <= 1
    text = (out / "report.md").read_text()
    assert "| family |" in text and "| generator |" in text

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "report.md"
              and p.name != "report.json" and "train_questions" not in p.name}
    assert quiz.main(["--fast", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained, generated or scored again
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]

    # a premise from before the dodge columns: they are added, nothing else is done again
    premise = json.loads((out / "premise.json").read_text())
    (out / "premise.json").write_text(json.dumps({f: {k: v for k, v in r.items() if not k.startswith("dodge_")}
                                                  for f, r in premise.items()}))
    assert quiz.main(["--fast", "--out", str(out)]) == 0
    assert json.loads((out / "premise.json").read_text()) == premise
    assert {p: p.stat().st_mtime_ns for p in stamps if p.name != "premise.json"} == \
        {p: t for p, t in stamps.items() if p.name != "premise.json"}

    # the report is a function of the small files alone, and re-scores the answers
    kept = tmp_path / "results"
    kept.mkdir()
    for p in out.iterdir():
        if p.is_file() and (p.name in ("settings.json", "premise.json") or p.name.endswith((".answers.jsonl",
                                                                                              ".metrics.jsonl"))):
            shutil.copy(p, kept / p.name)
    assert len(list(kept.glob("*.answers.jsonl"))) == 6 and len(list(kept.glob("*.metrics.jsonl"))) == 5
    assert quiz.report(kept)["text"] == (out / "report.md").read_text()
    assert quiz.main(["report", str(kept)]) == 0 and (out / "report.md").read_text() in capsys.readouterr().out
    rows = [json.loads(x) for x in (kept / "eq1.answers.jsonl").read_text().splitlines()]
    wrong = next(i for i, r in enumerate(rows) if not r["right"])
    asked = {q.prompt: q for qs in questions.questions(0).values() for q in qs}
    rows[wrong] = {**rows[wrong], "output": asked[rows[wrong]["prompt"]].right, "right": False}  # a stale flag
    (kept / "eq1.answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = quiz.report(kept)["results"]
    assert again["eq1"]["right"] == report["results"]["eq1"]["right"] + 1
    (kept / "rkl.metrics.jsonl").unlink()  # a run part-way through: left out, the rest reported
    assert "rkl" not in quiz.report(kept)["results"] and "eq3" in quiz.report(kept)["results"]

    page = tmp_path / "page.md"
    page.write_text(f"before\n<!-- quiz report: {kept} -->\nold tables\n<!-- /quiz report -->\nafter\n")
    assert quiz.main(["report", str(kept), "--docs", str(page)]) == 0
    assert page.read_text() == f"before\n<!-- quiz report: {kept} -->\n{quiz.report(kept)['text']}<!-- /quiz report -->\nafter\n"
    assert quiz.main(["report", str(out / "eq1"), "--docs", str(page)]) == 2
    assert quiz.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no settings.json: not a quiz folder" in capsys.readouterr().err
    good = {name: (kept / name).read_text() for name in ("settings.json", "premise.json")}
    assert set(json.loads(good["settings.json"])) == set(quiz.SETTINGS_KEYS)
    (kept / "settings.json").write_text("{cut off")
    assert quiz.main(["report", str(kept)]) == 2
    assert f"{kept / 'settings.json'}:1: not valid JSON" in capsys.readouterr().err
    premise = json.loads(good["premise.json"])
    no_greedy = {f: {k: v for k, v in r.items() if k != "greedy"} for f, r in premise.items()}
    for name, text, says in [("settings.json", "NaN", "not a quiz's settings"),
                             ("settings.json", "[]", "not a quiz's settings"),
                             ("settings.json", json.dumps({"seed": 0}), "not a quiz's settings"),
                             ("premise.json", "[1]", "not a quiz's premise"),
                             ("premise.json", json.dumps({"add": 1}), "not a quiz's premise"),
                             ("premise.json", json.dumps(no_greedy), "not a quiz's premise")]:
        (kept / name).write_text(text)
        assert quiz.main(["report", str(kept)]) == 2, (name, text)
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"quiz.py report: {kept / name}: {says}") and len(err.splitlines()) == 1
        (kept / name).write_text(good[name])
    # a premise measured before the dodge and rkl columns: the report shows them as "-"
    (kept / "premise.json").write_text(json.dumps({f: {k: v for k, v in r.items() if not k.startswith("dodge_")
                                                       and k != "agree_rkl_verifier"} for f, r in premise.items()}))
    row = next(x for x in quiz.report(kept)["text"].splitlines() if x.startswith("| add |"))
    assert row.split(" | ")[5:7] == ["-", "-"] and row.split(" | ")[13] == "-"
    # and a rerun of the experiment refuses a premise.json that is not one, before any work
    (out / "premise.json").write_text("[1]")
    assert quiz.main(["--fast", "--out", str(out)]) == 2
    assert f"{out / 'premise.json'}: not a quiz's premise" in capsys.readouterr().err


def test_a_run_longer_than_one_epoch_of_its_questions_reaches_its_last_step(tmp_path):
    """4 weekday questions keep 2 for training, one step's worth: 2 steps need 2 epochs of them."""
    gen, ver = quiz.build_fast(tmp_path / "world")
    report = quiz.run_quiz(gen, ver, out=str(tmp_path / "quiz"), steps=2, lr=1e-3, group_size=2, prompts_per_step=2,
                           max_new_tokens=2, seed=0, device="cpu", per_family=4, keep_all=True, families=("weekday",))
    assert (tmp_path / "quiz" / "self" / "checkpoint-2").is_dir() and report["results"]["self"]["n"] == 2


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--group-size", "1"], "--group-size 1 must be at least 2"),
    (["--lr", "nan"], "--lr nan must be a positive number"),
    (["--seeds", "0,x"], "--seeds '0,x': comma-separated integers"),
    (["--gen", "/nonexistent/model", "--verifier", "/nonexistent/model"], "cannot load model '/nonexistent/model'"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    assert quiz.main([*args, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert quiz.main(["--fast", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quiz.py: ") and str(tmp_path / "file") in err and len(err.splitlines()) == 1


def test_result_table_names_each_seed_of_a_run():
    r = {"right": 3, "n": 10, "accuracy": 0.3, "low": 0.1, "high": 0.6, "change": (0.0, -0.1, 0.1), "words": 5.0,
         "distinct_1": 1.0, "distinct_2": 1.0, "truncated": 0.0}
    text = quiz.result_table({"before": r, "eq1": r, "eq1-seed1": r, "rkl-seed1": r}, {})
    assert "| CME-GRPO, Eq. 1 (token) |" in text and "| CME-GRPO, Eq. 1 (token), seed 1 |" in text
    assert "| rkl: Eq. 1 less the policy's log-prob (reverse KL), seed 1 |" in text


def test_result_table_shows_distinct_n_of_one_word_answers_as_none():
    """Answers of one word ("................................") have no bigrams: distinct-2 is "-", not nan."""
    rows = [{"output": "." * 32, "right": False, "truncated": True}] * 4
    r = quiz.summary(rows, rows)
    assert r["words"] == 1.0 and r["distinct_1"] == 1.0 and math.isnan(r["distinct_2"])
    line = quiz.result_table({"random": r}, {}).splitlines()[-1]
    assert line.endswith("| 1.0 | 1.000 | - | 100% |") and "nan" not in line


def test_the_docs_tables_are_the_reports_of_the_committed_answer_files():
    """docs/quiz.md shows `quiz.py report` of results/quiz/*, re-scored by today's checker: a change to
    the checker or to the files that changes a number fails here until the page is rebuilt."""
    from conftest import ROOT

    page = (ROOT / "docs" / "quiz.md").read_text()
    blocks = re.findall(r"<!-- quiz report: (\S+) -->\n(.*?)<!-- /quiz report -->", page, re.S)
    assert sorted(f for f, _ in blocks) == sorted(f"results/quiz/{p.name}" for p in (ROOT / "results" / "quiz").iterdir())
    for folder, shown in blocks:
        assert shown == quiz.report(ROOT / folder)["text"], "rebuild: python quiz.py report results/quiz/* --docs docs/quiz.md"
