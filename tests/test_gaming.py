"""gaming.py: the degenerate responses, the preference share against a loop, the fast mode end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gaming


@pytest.mark.parametrize("text, first", [
    ("The cat sat. Then it slept.", "The cat sat."),
    ("Yes! It is.", "Yes!"),
    ("No full stop here", "No full stop here"),
    ("Line one\nLine two.", "Line one"),
    ("3.5 is a number. Yes.", "3.5 is a number."),
    ("", ""),
])
def test_first_sentence(text, first):
    assert gaming.first_sentence(text) == first


def test_degenerate_responses(tokenizers):
    tok = tokenizers["bytebpe"]
    made = gaming.degenerate("  Tell me about cats. ", "Cats purr. They sleep a lot.", tok, 40)
    assert set(made) == set(gaming.KINDS)
    assert made["restated"] == "Tell me about cats." and made["near-empty"] == gaming.NEAR_EMPTY
    loop = made["loop"]
    k = loop.count("Cats purr.")
    assert k >= 2 and loop == " ".join(["Cats purr."] * k)
    n = len(tok(loop, add_special_tokens=False).input_ids)
    assert n <= 40 < len(tok(loop + " Cats purr.", add_special_tokens=False).input_ids)  # filled to the limit
    assert gaming.degenerate("Hi", "", tok, 8)["loop"].startswith(gaming.NON_ANSWER)  # an empty sample


@given(st.lists(st.lists(st.integers(-3, 3), min_size=3, max_size=3), min_size=1, max_size=6),
       st.lists(st.integers(-3, 3), min_size=6, max_size=6))
@settings(max_examples=100, deadline=None)
def test_preference_counts_every_pair(samples, degenerate):
    s = np.array(samples, dtype=float)
    d = np.array(degenerate[:len(samples)], dtype=float)
    wins = sum(1.0 if d[p] > x else 0.5 if d[p] == x else 0.0 for p in range(len(s)) for x in s[p])
    assert gaming.preference(d, s) == pytest.approx(wins / s.size)


def test_fast_mode_prints_the_table_and_a_verdict(tmp_path, capsys):
    out = tmp_path / "check" / "check.json"
    assert gaming.main(["--fast", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| reward | restated | non-answer | loop | near-empty |" in text
    assert sum(line.startswith(("| Eq. 1 |", "| Eq. 3 |", "| rkl |")) for line in text.splitlines()) == 3
    assert text.strip().splitlines()[-1].startswith("verdict: ")
    result = json.loads(out.read_text())
    for reward, _ in gaming.REWARDS:
        assert set(result["shares"][reward]) == set(gaming.KINDS)
        assert all(0 <= v <= 1 for v in result["shares"][reward].values())
        assert all(np.isfinite(v) for v in result["mean"][reward].values())
        assert np.shape(result["rewards"][reward]) == (result["prompts"], 2 + len(gaming.KINDS))
    assert [len(r) for r in result["responses"]] == [2 + len(gaming.KINDS)] * result["prompts"]

    # the report recomputes every share from the raw rewards
    assert gaming.main(["report", str(out)]) == 0 and capsys.readouterr().out == text + "\n"
    first = result["rewards"]["token"][0]
    beat = first[2] > max(first[:2])  # prompt 0's restated response under Eq. 1: made to lose if it won, else to win
    first[2] = min(first[:2]) - 1.0 if beat else max(first[:2]) + 1.0
    out.write_text(json.dumps(result))
    assert gaming.main(["report", str(out)]) == 0
    redone = gaming.summarise(result["rewards"], 2)["shares"]["token"]["restated"]
    assert redone != result["shares"]["token"]["restated"]
    assert f"| Eq. 1 | {redone:.0%} |" in capsys.readouterr().out
    page = tmp_path / "page.md"
    page.write_text(f"<!-- gaming report: {out} -->\n<!-- /gaming report -->\n")
    assert gaming.main(["report", str(out), "--docs", str(page)]) == 0 and f"| Eq. 1 | {redone:.0%} |" in page.read_text()
    assert gaming.main(["report", str(out), "--docs", str(tmp_path / "nowhere.md")]) == 2
    page.write_text("no markers\n")
    assert gaming.main(["report", str(out), "--docs", str(page)]) == 2
    assert "has no '<!-- gaming report:" in capsys.readouterr().err
    out.write_text("{cut off")
    assert gaming.main(["report", str(out)]) == 2
    assert capsys.readouterr().err == f"gaming.py report: {out}:1: not valid JSON (Expecting property name enclosed in double quotes)\n"


@pytest.mark.parametrize("args, message", [(["--num-prompts", "0"], "--num-prompts 0 must be at least 1"),
                                           (["--prompts", "/nonexistent.jsonl"], "prompt file not found")])
def test_bad_input_is_one_line(args, message, capsys):
    assert gaming.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_limit_past_the_generators_context_is_refused(tmp_path):
    """A huge --max-new-tokens would build the loop response for ever: refused against the context."""
    gen, ver, prompts = gaming.build_fast(tmp_path / "world")
    with pytest.raises(ValueError, match="--max-new-tokens 1000000000: the generator's context is"):
        gaming.check(gen, ver, prompts, 2, 10 ** 9)


def test_the_docs_tables_are_the_reports_of_the_committed_files():
    """docs/gaming.md shows `gaming.py report` of results/gaming/*.json, each share recomputed from the
    raw rewards those files keep."""
    import re

    from conftest import ROOT

    page = (ROOT / "docs" / "gaming.md").read_text()
    blocks = re.findall(r"<!-- gaming report: (\S+) -->\n(.*?)<!-- /gaming report -->", page, re.S)
    assert len(blocks) == 2
    for name, shown in blocks:
        result = json.loads((ROOT / name).read_text())
        assert shown == gaming.table({**result, **gaming.summarise(result["rewards"], result["samples"])}) + "\n", \
            f"rebuild: python gaming.py report {name} --docs docs/gaming.md"
