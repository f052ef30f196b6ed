"""quiz.py: the questions and their checker, the statistics, and the fast mode end to end."""
from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quiz


def test_every_right_sentence_is_right_and_every_wrong_one_wrong():
    """The checker against the sentences the generator of questions wrote itself, for all of them."""
    every = quiz.questions(0)
    assert set(every) == set(quiz.FAMILIES) and all(len(qs) >= 28 for qs in every.values())
    for qs in every.values():
        for q in qs:
            assert quiz.is_right(q, q.right), q
            assert not quiz.is_right(q, q.wrong), q
            assert not quiz.is_right(q, q.dodge), q
            assert q.right != q.wrong and quiz.INSTRUCTION in q.prompt


@pytest.mark.parametrize("family, answer, response, right", [
    ("add", "12", "5 plus 7 is 12.", True),
    ("add", "12", "The answer is twelve.", True),
    ("add", "12", "5 + 7 = 13", False),
    ("add", "12", "To find 5 plus 7, we add them: 5 + 7 = 12, so twelve", True),
    ("add", "12", "I don't know.", False),
    ("add", "12", "", False),
    ("units", "1000", "There are 1,000 grams in a kilogram.", True),
    ("subtract", "5", "10 minus 5 is 5.", True),   # a question's number that is also the answer counts
    ("subtract", "5", "10 minus 5 is 4.", False),
    ("subtract", "5", "10 minus 5 is 10.", False),  # the question restated, then a wrong number of it
    ("subtract", "5", "10 - 5 = 5", True),
    ("subtract", "5", "10 - 5 = 5, so 5 + 5 = 10", True),
    ("add", "16", "7 plus 9 is 7 plus 9.", False),
    ("add", "16", "9 + 7 = 16", True),
    ("units", "200", "There are 200 centimeters in 2 meters.", True),
    ("units", "3000", "Multiply 3 by 1000: 3 kilograms are 3000 grams.", True),
    ("units", "3000", "Multiply 3 by 1000, which is 300 grams.", False),
    ("units", "42", "It is forty-two.", True),
    ("capital", "Bogota", "The capital of Colombia is Bogotá.", True),
    ("capital", "Paris", "Paris, not Rome.", True),
    ("capital", "Paris", "Rome, not Paris.", False),
    ("capital", "Paris", "The capital of France is Lyon.", False),
    ("antonym", "short", "The opposite of long is short.", True),   # "short" is also in INSTRUCTION
    ("antonym", "short", "The opposite of long is brief.", False),
    ("weekday", "Tuesday", "The day after Monday is Tuesday.", True),  # the question's own day is not an answer
    ("weekday", "Tuesday", "The day after Monday is Wednesday, not Tuesday.", False),
])
def test_checker_on_written_out_cases(family, answer, response, right):
    asked = {("units", "1000"): "How many grams are in a kilogram?", ("units", "42"): "How many?"}
    wanted = {("units", "3000"): "kilograms", ("units", "200"): "centimeters", ("subtract", "5"): "10 minus",
              ("add", "16"): "7 plus 9"}
    if (family, answer) in asked:
        q = quiz.Question(family, f"{asked[family, answer]} {quiz.INSTRUCTION}", answer, "", "")
    else:
        q = next(q for q in quiz.questions(0)[family] if q.answer == answer and wanted.get((family, answer), "") in q.prompt)
    assert quiz.is_right(q, response) is right


# The rule: an answer is right when it commits to the right answer and to nothing else (quiz.is_right).
COMMITS = [  # (family, question's operands or key, response, right)
    # the question restated in words is taken out, as in digits
    ("subtract", "12 minus 6", "Twelve minus six is twelve.", False),
    ("subtract", "12 minus 6", "Twelve minus six is six.", True),
    ("subtract", "12 minus 6", "twelve minus six equals 6", True),
    # a minus sign makes a number negative; between two numbers it is subtraction
    ("subtract", "12 minus 6", "The answer is -6.", False),
    ("subtract", "12 minus 6", "The answer is \u22126.", False),
    ("subtract", "12 minus 6", "12 -6 = 6", True),
    ("subtract", "12 minus 6", "12-6=6", True),
    # denial: "not X" commits against X
    ("add", "5 plus 7", "5 plus 7 is 13, not 12.", False),
    ("add", "5 plus 7", "5 plus 7 is 12, not 13.", True),
    ("add", "5 plus 7", "It isn't 12.", False),
    ("add", "5 plus 7", "The answer is not 12 but 13.", False),
    ("add", "5 plus 7", "It is 12 rather than 13.", True),
    ("add", "5 plus 7", "12, never 11.", True),
    # hedges: two answers are no answer
    ("add", "5 plus 7", "It is 11 or 12.", False),
    ("add", "5 plus 7", "Either 12 or 13.", False),
    ("add", "5 plus 7", "It is 12. Or maybe 13.", False),
    # numbers in words and digit groups
    ("units", "2 meters", "There are two hundred centimeters in 2 meters.", True),
    ("units", "2 meters", "There are 200 centimeters in two meters.", True),
    ("units", "10 kilometers", "There are 10 000 meters in 10 kilometers.", True),
    ("units", "10 kilometers", "There are 10,000 meters in 10 kilometers.", True),
    ("units", "10 kilometers", "There are ten thousand meters in ten kilometers.", True),
    ("units", "10 kilometers", "There are 1000 meters in 10 kilometers.", False),
    ("multiply", "9 times 8", "9 times 8 is seventy-two.", True),
    ("multiply", "9 times 8", "Nine times eight is seventy two.", True),
    ("multiply", "9 times 8", "8 times 9 is 72.", True),
    ("multiply", "9 times 8", "9 x 8 = 63", False),
    # "one" as a pronoun is not a number
    ("add", "5 plus 7", "The answer is 12. That one was easy!", True),
    ("add", "5 plus 7", "The answer is 12, the one you wanted.", True),
    ("add", "5 plus 7", "One answer: 12.", True),
    # working before the claim
    ("add", "5 plus 7", "Add 5 and 7 to get 12.", True),
    ("add", "5 plus 7", "5 + 7 = 12", True),
    ("add", "5 plus 7", "5 + 7 = 12. So the answer is 13.", False),
    # words: denied, alternatives, the only one named
    ("capital", "France", "It is not Paris.", False),
    ("capital", "Australia", "Sydney, not Canberra.", False),
    ("capital", "Australia", "Canberra, not Sydney.", True),
    ("capital", "France", "Paris or Rome.", False),
    ("capital", "France", "Paris, and Rome is the capital of Italy.", False),
    ("capital", "France", "Paris is the capital of France.", True),
    ("capital", "France", "The capital isn't Rome; it is Paris.", True),
    ("antonym", "hot", "The opposite of hot is cold.", True),
    ("antonym", "hot", "The opposite of hot is not cold.", False),
    ("antonym", "hot", "Cold or warm.", False),
    ("weekday", "the day after Monday", "The day after Monday is Tuesday.", True),
    ("weekday", "the day after Monday", "Tuesday, not Wednesday.", True),
    ("weekday", "the day after Monday", "It is Tuesday or Wednesday.", False),
    ("weekday", "the day after Monday", "Monday.", False),
]


@pytest.mark.parametrize("family, key, response, right", [c for c in COMMITS if c[3] is not None])
def test_an_answer_is_right_when_it_commits_to_the_answer_and_nothing_else(family, key, response, right):
    every = quiz.questions(0)[family]
    q = next(q for q in every if re.search(r"\b" + re.escape(key) + r"\b", q.prompt.replace('"', "")))
    assert quiz.is_right(q, response) is right, (q.prompt, q.answer)


@given(st.integers(0, 999999))
def test_numbers_in_words_and_groups_read_as_their_value(n):
    """The reader of numbers against the number itself, written in digits, in groups and in words."""
    def words(x):
        if x < 20:
            return ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"][x]
        if x < 100:
            tens = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"][x // 10]
            return tens + ("-" + words(x % 10) if x % 10 else "")
        if x < 1000:
            return words(x // 100) + " hundred" + (" and " + words(x % 100) if x % 100 else "")
        return words(x // 1000) + " thousand" + (" " + words(x % 1000) if x % 1000 else "")
    for text in (str(n), f"{n:,}", f"{n:,}".replace(",", " "), words(n)):
        assert quiz.numbers_in(f"The answer is {text}.") == [float(n)], text


def test_split_shares_no_question_and_is_the_same_every_time():
    every = quiz.questions(0)
    train, held = quiz.split(every)
    assert quiz.split(quiz.questions(0)) == (train, held)
    for f, qs in every.items():
        assert not {q.prompt for q in train[f]} & {q.prompt for q in held[f]}
        assert sorted(q.prompt for q in train[f] + held[f]) == sorted(q.prompt for q in qs)
        assert round(0.4 * len(qs)) <= len(held[f]) <= round(0.4 * len(qs)) + 1  # whole pairs of twins
    # no held-out sum or product has its mirror in training ("7 plus 5" for "5 plus 7")
    for f in ("add", "add2", "multiply"):
        operands = [tuple(sorted(map(int, re.findall(r"\d+", q.prompt)))) for q in train[f]]
        for q in held[f]:
            assert tuple(sorted(map(int, re.findall(r"\d+", q.prompt)))) not in operands, q.prompt
    mirrors = [q for q in every["add"] if "7 plus 5" in q.prompt or "5 plus 7" in q.prompt]
    assert len(mirrors) == 2 and len({quiz.twins(q) for q in mirrors}) == 1
    assert sum(len(h) for h in held.values()) >= 200


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


def test_fast_mode_end_to_end_then_a_rerun_reuses_every_stage(tmp_path):
    out = tmp_path / "quiz"
    assert quiz.main(["--fast", "--out", str(out)]) == 0
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
