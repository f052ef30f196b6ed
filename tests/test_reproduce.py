"""reproduce.py: Table 1 end to end on tiny local models with two local judges, interrupted and resumed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rows = ["Name a fruit.", "Say goodbye.", "What is two plus two?", "Describe rain.", "Write 中文.", "List colours."]
    path.write_text("".join(json.dumps({"index": i, "instruction": p}) + "\n" for i, p in enumerate(rows)))
    return path


def table1_args(built, four_prompts, eval_prompts, out, *extra) -> list[str]:
    """Table 1 shrunk to tiny models: qwen2 as the pretrained generator, llama as its "instruct",
    gemma3 as verifier and reference; two tiny local judges (batch_size=1: each verdict computed alone,
    so a resumed run's batches cannot change a number)."""
    return ["table1", "--gen", str(built["qwen2"]), "--instruct", str(built["llama"]), "--ref", str(built["gemma3"]),
            "--verifier", str(built["gemma3"]), "--prompts", str(four_prompts), "--eval-prompts", str(eval_prompts),
            "--max-steps", "3", "--max-new-tokens", "8", "--replicates", "2", "--bootstrap", "200",
            "--judge", f"hf:{built['qwen2']}?max_new_tokens=4&batch_size=1&name=judge-a",
            "--judge", f"hf:{built['llama']}?max_new_tokens=4&batch_size=1&name=judge-b",
            "--train", "group_size=2", "--train", "prompts_per_step=2", "--train", "micro_batch=4",
            "--train", "lr=1e-3", "--train", "save_every=1", "--device", "cpu", "--out", str(out), *extra]


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "reproduce.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


def test_table1_interrupted_and_rerun_gives_the_uninterrupted_table(built, four_prompts, eval_prompts, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    r = run(table1_args(built, four_prompts, eval_prompts, whole))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = json.loads((whole / "table1.json").read_text())
    assert {(w["candidate"], w["opponent"]) for w in expected["win_rates"]} == {
        ("cme", "base"), ("cme", "instruct"), ("instruct", "base"), ("base", "ref"), ("cme", "ref"),
        ("instruct", "ref")}
    assert {w["judge"] for w in expected["win_rates"]} == {"judge-a", "judge-b", "mean of 2 judges"}
    assert all(w["n"] == 6 for w in expected["win_rates"])
    row = expected["table1"][0]
    assert row["CME vs Base"]["win_rate"] == next(w["win_rate"] for w in expected["win_rates"]
                                                  if w["judge"].startswith("mean") and w["candidate"] == "cme"
                                                  and w["opponent"] == "base")
    for ext in ("txt", "md", "csv"):
        assert "CME vs Base" in (whole / f"table1.{ext}").read_text()
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["commands"][0]["packages"]["torch"] and "git_commit" in manifest["commands"][0]
    assert manifest["stages"]["train-cme"]["config"]["max_steps"] == 3
    assert all("finished" in s for s in manifest["stages"].values())

    # Interrupt once, mid-judging (Ctrl-C right after the 30th judgment: 6 prompts x 2 replicates x 2 judges
    # = 24 per comparison, so 6 into the second comparison), then rerun the same command.
    r = subprocess.run([sys.executable, "tests/reproduce_hooks.py", "interrupt-after:30",
                        *table1_args(built, four_prompts, eval_prompts, broken)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "rerun the same command to continue" in r.stderr and not (broken / "table1.json").exists()
    counts = [p.read_bytes().count(b"\n") for p in sorted((broken / "judgments").glob("*.jsonl"))]
    assert sum(counts) == 30 and sorted(counts) == [6, 24], counts  # stopped midway through the second
    first = broken / "judgments" / "instruct_vs_base.jsonl"

    r = run(table1_args(built, four_prompts, eval_prompts, broken))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train-cme: done" in r.stderr and "generate-base: done" in r.stderr
    assert json.loads((broken / "table1.json").read_text()) == expected

    # Everything done: a third run asks nothing, and the dry run says so.
    lines = first.read_bytes().count(b"\n")
    r = run(table1_args(built, four_prompts, eval_prompts, broken))
    assert r.returncode == 0 and first.read_bytes().count(b"\n") == lines == 24
    r = run(table1_args(built, four_prompts, eval_prompts, broken, "--dry-run"))
    assert r.returncode == 0 and "judge calls to make: 0" in r.stdout and "[to do]" not in r.stdout


def test_dry_run_prints_the_plan_and_the_paper_sized_cost(tmp_path):
    r = run(["table1", "--gen", "Qwen/Qwen2.5-0.5B", "--instruct", "Qwen/Qwen2.5-0.5B-Instruct", "--judge", "api:a",
             "--judge", "api:b", "--dry-run", "--out", str(tmp_path / "plan"), "--step-seconds", "30", "--device",
             "cuda"])
    assert r.returncode == 0, r.stderr
    assert "judge calls to make: 48,300" in r.stdout  # 805 prompts x 5 replicates x 2 judges x 6 comparisons
    assert "312 steps (assuming openbmb/UltraFeedback holds --num-prompts 5000 that all fit) x 30.0 s " \
           "(--step-seconds, taken to be one step at this stage's settings: 16 prompts x G = 8, up to 2048 new " \
           "tokens, token reward) = 2.60 GPU-hours" in r.stdout  # 5,000 prompts / 16 per step, one epoch
    r = run(["table1", "--gen", "Qwen/Qwen2.5-0.5B", "--instruct", "Qwen/Qwen2.5-0.5B-Instruct", "--judge", "api:a",
             "--dry-run", "--out", str(tmp_path / "plan"), "--device", "cpu", "--step-seconds", "30"])
    assert "= 2.60 CPU-hours" in r.stdout  # what a CPU's measured step prices is not GPU time
    assert r.stdout.count("[to do]") == 1 + 4 + 6 and not (tmp_path / "plan").exists()
    r = run(["table2", "--gen", "Qwen/Qwen2.5-0.5B", "--instruct", "Qwen/Qwen2.5-0.5B-Instruct", "--judge", "api:a",
             "--dry-run", "--out", str(tmp_path / "plan")])
    assert r.returncode == 0 and "train-rent" in r.stdout and "--reward rent" in r.stdout
    assert "judge calls to make: 16,100" in r.stdout  # 805 x 5 x 1 judge x 4 comparisons
    r = run(["figure3", "--gen", "Qwen/Qwen2.5-0.5B", "--instruct", "Qwen/Qwen2.5-0.5B-Instruct", "--judge", "api:a",
             "--verifiers", "google/gemma-3-270m-it,google/gemma-3-1b-it", "--dry-run", "--out", str(tmp_path / "p")])
    assert r.returncode == 0 and "train-cme-random" in r.stdout and "--verifier-init random" in r.stdout
    assert "train-cme-gemma-3-270m-it" in r.stdout and "judge calls to make: 24,150" in r.stdout  # 3 x 2 x 4,025


def test_a_changed_setting_on_a_started_run_is_refused_in_one_line(built, four_prompts, eval_prompts, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"commands": [], "stages": {
        "judge-cme_vs_base": {"config": {"judges": ["x"], "replicates": 5, "seed": 0, "limit": None}}}}))
    r = run(table1_args(built, four_prompts, eval_prompts, out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stage judge-cme_vs_base was started with other settings (judges, replicates" in r.stderr
    for args, message in ((["--train", "lr"], "expected KEY=VALUE"), (["--train", "reward=banana"], "reward must be"),
                          (["--train", "lr=-1"], "--lr -1.0: must be above 0"), (["--replicates", "0"], "at least 1")):
        r = run(table1_args(built, four_prompts, eval_prompts, tmp_path / "other", *args, "--dry-run"))
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_figure3_and_table2_share_a_folder_and_draw_their_results(built, four_prompts, eval_prompts, tmp_path):
    """figure3 (random control + two verifiers) then table2 into the same folder, one judge, one replicate."""
    out = tmp_path / "run"
    common = ["--gen", str(built["qwen2"]), "--instruct", str(built["llama"]), "--prompts", str(four_prompts),
              "--eval-prompts", str(eval_prompts), "--eval-limit", "3", "--max-steps", "1", "--max-new-tokens", "6",
              "--replicates", "1", "--bootstrap", "100", "--judge", f"hf:{built['qwen2']}?max_new_tokens=3&name=j",
              "--train", "group_size=2", "--train", "prompts_per_step=2", "--device", "cpu", "--out", str(out)]
    r = run(["figure3", *common, "--verifiers", f"{built['gemma3']},{built['llama']}"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "figure3.json").read_text())
    rows = {row[0]: row[1:] for row in report["tables"][0]["rows"]}
    assert set(rows) == {"random", "gemma3", "llama"} and all(len(v) == 2 for v in rows.values())
    assert (out / "figure3.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "manifest.json").read_text())["stages"]
    assert config["train-cme-random"]["config"]["verifier_init"] == "random"
    assert config["train-cme-random"]["config"]["verifier"] == str(built["gemma3"])

    r = run(["table2", *common, "--verifier", str(built["gemma3"])])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generate-base: done" in r.stderr  # shared with figure3: the same name and settings
    table = json.loads((out / "table2.json").read_text())["tables"][0]
    assert table["header"] == ["row", "cme vs Base", "rent vs Base", "cme vs Instruct", "rent vs Instruct"]
    assert json.loads((out / "manifest.json").read_text())["stages"]["train-rent"]["config"]["reward"] == "rent"


def test_a_result_with_no_judgments_is_one_line_not_a_traceback(tmp_path):
    import reproduce

    for target in ("table1", "table2", "figure3"):
        with pytest.raises(ValueError, match=f"{target}: no judgments to report"):
            reproduce.write_results(tmp_path, target, {"win_rates": [], "agreement": [], "table1": []})


def test_dry_run_counts_the_steps_left_after_the_context_drops_prompts(built, tmp_path):
    """A local generator and prompt file: prompts over --max-prompt-tokens are not counted as steps,
    as training skips them (2 long prompts of 6, 2 per step: 2 steps, not 3)."""
    prompts = tmp_path / "p.jsonl"
    rows = [f"Say {w}." for w in ("hi", "yes", "no", "ok")] + ["word " * 400, "text " * 600]
    prompts.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in rows))
    r = run(["table1", "--gen", str(built["qwen2"]), "--instruct", str(built["llama"]), "--judge", "api:a",
             "--prompts", str(prompts), "--train", "prompts_per_step=2", "--train", "max_prompt_tokens=100",
             "--max-new-tokens", "64",
             "--dry-run", "--out", str(tmp_path / "plan"), "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    assert "2 steps (4 of 6 prompts fit the context and --max-prompt-tokens); time unknown" in r.stdout, r.stdout
