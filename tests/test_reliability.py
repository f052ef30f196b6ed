"""Bad input and faults, as a new user meets them: one line on stderr and exit code 2, nothing silently
wrong, nothing lost. Each class of the reliability issue: bad numbers and devices, resume refusals and
the log truncation after a kill, a broken checkpoint, a full disk, convert never destroying an input,
keys never printed, unreadable files, oversized prompts, unsupported tokenizers."""
from __future__ import annotations

import errno
import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from conftest import ROOT, in_process

import evaluate as E
import judge as J
import records as R
import runs
import sampling as S
import train as T


def last_line_error(stderr: str, expect: str) -> None:
    """The run ended with one error line (what came before is progress output, never a traceback)."""
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: ")
    assert expect in stderr.strip().splitlines()[-1], stderr[-2000:]


def one_line_error(capsys, expect: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    return err


# --- numbers and devices ------------------------------------------------------------------------------

def test_every_numeric_flag_declares_its_range():
    for f in fields(T.Config):
        if f.type in ("int", "float"):
            assert "check" in f.metadata, f"--{f.name} has no range rule"


@pytest.mark.parametrize("args,expect", [
    (["--grad-clip", "nan"], "--grad-clip nan: must be a finite number"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be above 0"),
    (["--beta", "nan"], "--beta nan: must be a finite number"),
    (["--beta", "-0.1"], "--beta -0.1: must be at least 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "0"], "--lr 0.0: must be above 0"),
    (["--weight-decay", "nan"], "--weight-decay nan"),
    (["--temperature", "0"], "--temperature 0.0: must be above 0"),
    (["--top-p", "1.5"], "--top-p 1.5: must lie in (0, 1]"),
    (["--clip-eps", "1"], "--clip-eps 1.0: must lie in (0, 1)"),
    (["--adv-eps", "-1"], "--adv-eps -1.0: must be at least 0"),
    (["--save-every", "0"], "--save-every 0: must be at least 1"),
    (["--logprob-chunk", "0"], "--logprob-chunk 0: must be at least 1"),
    (["--verifier-token-budget", "0"], "--verifier-token-budget 0"),
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be at least 0"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--num-iterations", "0"], "--num-iterations 0: must be at least 1"),
    (["--clip-eps-high", "nan"], "--clip-eps-high nan: must be a finite number"),
    (["--clip-eps-high", "-0.1"], "--clip-eps-high -0.1: must be at least 0"),
    (["--lora-rank", "-4"], "--lora-rank -4: must be at least 0"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0: must be above 0"),
    (["--device", "banana"], "--device banana: not a device"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
])
def test_train_bad_values_get_one_line_naming_the_flag(args, expect, capsys):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert T.main(["--prompts", "never-read.jsonl", *args]) == 2  # checked before anything is read or loaded
    one_line_error(capsys, expect)


@pytest.mark.parametrize("args,expect", [
    (["judge", "a.jsonl", "b.jsonl", "--judge", "hf:x", "--out", "j.jsonl", "--verdict-tries", "0"], "--verdict-tries 0"),
    (["judge", "a.jsonl", "b.jsonl", "--judge", "hf:x", "--out", "j.jsonl", "--replicates", "0"], "--replicates 0"),
    (["report", "j.jsonl", "--bootstrap", "0"], "--bootstrap 0: must be at least 1"),
    (["report", "j.jsonl", "--bootstrap", "-5"], "--bootstrap -5: must be at least 1"),
    (["cme", "o.jsonl", "--limit", "0"], "--limit 0: must be at least 1"),
    (["generate", "--model", "m", "--out", "o.jsonl", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["generate", "--model", "m", "--out", "o.jsonl", "--max-new-tokens", "0"], "--max-new-tokens 0"),
])
def test_evaluate_bad_counts_get_one_line_naming_the_flag(args, expect, capsys):
    assert E.main(args) == 2
    one_line_error(capsys, expect)


@pytest.mark.parametrize("spec,expect", [
    ("api:gpt?concurrency=0", "option concurrency must be an integer of at least 1, not 0"),
    ("api:gpt?timeout=abc", "option timeout must be a number above 0, not 'abc'"),
    ("api:gpt?retries=-1", "option retries must be an integer of at least 0"),
    ("hf:x?batch_size=0", "option batch_size must be an integer of at least 1"),
])
def test_judge_spec_options_are_checked(spec, expect, tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"index": 0, "instruction": "i", "output": "o", "generator": "a"}) + "\n")
    assert E.main(["judge", str(a), str(a), "--judge", spec, "--out", str(tmp_path / "j.jsonl")]) == 2
    one_line_error(capsys, expect)


def test_a_key_written_into_the_spec_is_never_printed(tmp_path, capfd):
    secret = "sk-proj-" + "A1b2C3d4" * 6
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"index": 0, "instruction": "i", "output": "o", "generator": "a"}) + "\n")
    specs = [f"api:gpt-5.2?key={secret}", f"api:gpt-5.2?key={secret}&bogus", f"api:gpt?base=http://127.0.0.1:9&key={secret}"]
    for spec in specs:
        r = subprocess.run([sys.executable, "evaluate.py", "judge", str(a), str(a), "--judge", spec, "--out",
                            str(tmp_path / "j.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and secret not in r.stdout + r.stderr and secret[8:20] not in r.stderr
        assert r.stderr.count("\n") == 1
    assert "the NAME of the environment variable" in r.stderr
    assert not (tmp_path / "j.jsonl").exists() or secret not in (tmp_path / "j.jsonl").read_text()
    assert J.redact_spec("api:m?key=OPENAI_API_KEY&x=1") == "api:m?key=OPENAI_API_KEY&x=1"  # a name stays


def test_generate_bad_device_and_out_folder(built, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "Hi"}) + "\n")
    args = ["generate", "--model", str(built["qwen2"]), "--prompts", str(prompts)]
    assert E.main(args + ["--out", str(tmp_path / "o.jsonl"), "--device", "banana"]) == 2
    one_line_error(capsys, "--device banana: not a device")
    (tmp_path / "folder").mkdir()
    assert E.main(args + ["--out", str(tmp_path / "folder"), "--device", "cpu"]) == 2
    one_line_error(capsys, "is a folder")
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"index": 0, "instruction": "i", "output": "o", "generator": "a"}) + "\n")
    assert E.main(["judge", str(a), str(a), "--judge", "hf:x", "--out", str(tmp_path / "folder")]) == 2
    one_line_error(capsys, "is a folder")


# --- files: unreadable input, a cut-off last line, convert ----------------------------------------------

def test_binary_prompt_files_are_named(tmp_path, capsys):
    for suffix in (".jsonl", ".json", ".txt"):
        bad = tmp_path / f"prompts{suffix}"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
        assert T.main(["--prompts", str(bad), "--device", "cpu"]) == 2
        one_line_error(capsys, f"{bad}: not UTF-8 text")
    assert E.main(["report", str(tmp_path / "prompts.jsonl")]) == 2
    one_line_error(capsys, f"{tmp_path / 'prompts.jsonl'}: cannot read it")
    broken = tmp_path / "x.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    assert E.main(["report", str(broken)]) == 2
    one_line_error(capsys, str(broken))


def judgment(i: int, verdict: str = "win") -> dict:
    return {"key": f"k{i}", "index": i, "candidate": "a", "opponent": "b", "judge": "j", "verdict": verdict,
            "replicate": 0, "swapped": False, "len_candidate": 1, "len_opponent": 1}


def test_report_says_when_it_skips_a_cut_off_last_line(tmp_path, capsys):
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(judgment(i)) + "\n" for i in range(4)) + '{"key": "k9", "ind')
    assert E.main(["report", str(path), "--bootstrap", "10"]) == 0
    out = capsys.readouterr()
    assert f"skipped the unfinished last line 5 of {path}" in out.err and " 4 " in out.out


def alpaca_row(i: int) -> dict:
    return {"index": i, "instruction": f"q{i}", "candidate": "a", "opponent": "b", "output_candidate": "x",
            "output_opponent": f"y{i}", "ae_annotator": "gpt4", "ae_p_candidate_preferred": 0.7}


def test_convert_never_destroys_an_input_and_appends(tmp_path, capsys):
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps(alpaca_row(i)) + "\n" for i in range(3)))
    before = ann.read_bytes()
    assert E.main(["convert", str(ann), "--out", str(ann)]) == 2  # --out X where X is an input
    one_line_error(capsys, "is one of the input files")
    assert ann.read_bytes() == before
    out = tmp_path / "j.jsonl"
    out.write_text(json.dumps(judgment(100)) + "\n")  # an existing judgments file keeps its records
    assert E.main(["convert", str(ann), "--out", str(out)]) == 0
    assert "appended 3 judgments" in capsys.readouterr().err
    keys = [r["key"] for r in R.read_jsonl(out)]
    assert keys[0] == "k100" and len(keys) == 4
    assert E.main(["convert", str(ann), "--out", str(out)]) == 0  # a rerun adds nothing
    assert "appended 0 judgments" in capsys.readouterr().err and len(R.read_jsonl(out)) == 4
    gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({k: v for k, v in alpaca_row(7).items() if k != "output_opponent"}) + "\n")
    assert E.main(["convert", str(gz), "--out", str(out)]) == 2
    one_line_error(capsys, f"{gz}: record 1 has no 'output_opponent' field")
    assert len(R.read_jsonl(out)) == 4


# --- prompts that do not fit, and unsupported tokenizers ---------------------------------------------

def test_a_huge_prompt_is_skipped_before_any_work(built, tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = ["Say hi.", "Name a colour.", "x" * 500_000, "Count to two."]
    prompts.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in rows))
    args = ["--gen", built["qwen2"], "--verifier", built["gemma3"], "--prompts", prompts, "--out", tmp_path / "run",
            "--group-size", 2, "--prompts-per-step", 1, "--max-new-tokens", 4, "--max-steps", 1, "--device", "cpu",
            "--sample-every", 0]
    r = cli(*args, "--max-prompt-tokens", 0)  # no cap: the context alone
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 of 4 prompts longer than 2044 tokens (the generator's context of 2048 tokens" in r.stderr
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(built["qwen2"])
    lengths = [len(tok(S.chat_prefix(tok, p), add_special_tokens=False).input_ids) for p in rows]
    cap = min(lengths)  # --max-prompt-tokens: only the shortest prompt(s) fit
    r = cli(*args, "--max-prompt-tokens", cap)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"skipped {sum(n > cap for n in lengths)} of 4 prompts longer than {cap} tokens" in r.stderr
    r = cli(*args[:-4], "--max-new-tokens", 4096)
    assert r.returncode == 2
    last_line_error(r.stderr, "--max-new-tokens 4096: the generator's context is 2048")
    ev = tmp_path / "e.jsonl"
    ev.write_text("".join(json.dumps({"instruction": p, "index": i}) + "\n" for i, p in enumerate(rows)))
    r = in_process(E.main, "generate", "--model", built["qwen2"], "--prompts", ev, "--out", tmp_path / "o.jsonl",
                   "--device", "cpu", "--max-new-tokens", 8)
    assert r.returncode == 2
    last_line_error(r.stderr, "1 prompts (index 2) do not fit the model's context")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_wordpiece_generator_is_refused_before_the_first_rollout(built, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS
    import tiny

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS * 5, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"],
                                                                  show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[SEP]", pad_token="[UNK]").save_pretrained(tmp_path / "wp")
    model = tiny.build_model(tmp_path / "wpm", tmp_path / "wp", "llama")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\nYo\n")
    out = tmp_path / "run"
    args = ["--gen", model, "--verifier", built["gemma3"], "--prompts", prompts, "--out", out, "--group-size", 2,
            "--prompts-per-step", 1, "--max-new-tokens", 4, "--device", "cpu"]
    r = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    last_line_error(r.stderr, "unsupported decoder step")
    assert not (out / "metrics.jsonl").exists()


# --- resume: refusals, the log after a kill, a broken checkpoint, a full disk ---------------------------

def run_args(built, prompts, out, *extra):
    return ["--gen", built["qwen2"], "--verifier", built["gemma3"], "--prompts", prompts, "--out", out,
            "--group-size", 2, "--prompts-per-step", 1, "--micro-batch", 2, "--max-new-tokens", 6, "--lr", 1e-3,
            "--warmup-steps", 1, "--sample-every", 1, "--device", "cpu", "--epochs", 200, *extra]


def cli(*args) -> subprocess.CompletedProcess:
    """train.py's main in this process, with its exit code and output (no interpreter start)."""
    return in_process(T.main, *args)


@pytest.fixture(scope="module")
def one_step_run(built, four_prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli(*run_args(built, four_prompts, out, "--max-steps", 1)).returncode == 0
    return out


@pytest.mark.parametrize("change,flag", [
    (["--verifier-init", "random"], "--verifier-init"),
    (["--lr", "5e-4"], "--lr"),
    (["--no-mask-whitespace"], "--mask-whitespace"),
    (["--reward", "sequence"], "--reward"),
    (["--temperature", "0.7"], "--temperature"),
    (["--grad-clip", "0.5"], "--grad-clip"),
])
def test_resume_refuses_settings_that_change_what_is_computed(built, four_prompts, one_step_run, change, flag):
    r = cli(*run_args(built, four_prompts, one_step_run, "--resume", "--max-steps", 2, *change))
    assert r.returncode == 2
    last_line_error(r.stderr, f"--resume: {flag} was")


def test_resume_refuses_another_verifier_and_rewritten_prompts(built, four_prompts, one_step_run, tmp_path):
    args = run_args(built, four_prompts, one_step_run, "--resume", "--max-steps", 2)
    args[3] = built["llama"]  # --verifier
    r = cli(*args)
    assert r.returncode == 2 and "--resume: --verifier was" in r.stderr
    moved = tmp_path / "prompts.jsonl"  # same path, rewritten content
    moved.write_text(four_prompts.read_text())
    cfg = json.loads((one_step_run / "config.json").read_text())
    assert cfg["prompts_sha256"]
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(one_step_run, copy)
    for state_file in copy.glob("checkpoint-*/training_state.pt"):  # point the checkpoint at the new path
        state = torch.load(state_file, weights_only=True)
        state["config"]["prompts"] = str(moved)
        torch.save(state, state_file)
    moved.write_text(four_prompts.read_text().replace("haiku", "limerick"))
    r = cli(*run_args(built, moved, copy, "--resume", "--max-steps", 2))
    assert r.returncode == 2 and "are not the ones the checkpoint trained on" in r.stderr
    r = cli(*run_args(built, four_prompts, one_step_run, "--resume", "--max-steps", 2, "--save-every", 7))
    assert r.returncode == 0, r.stderr[-2000:]  # how often to save is not what is computed


def test_resume_after_a_kill_logs_each_step_once(built, four_prompts, tmp_path):
    """A real SIGKILL after a step past the last checkpoint was logged: the resumed run starts from the
    checkpoint and redoes that step; metrics.jsonl and samples.jsonl must not hold it twice."""
    out, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    # killed when step 4's update is done: steps 1-3 logged, checkpoint-2 the newest (every 2)
    proc = subprocess.run([sys.executable, "tests/dist_hooks.py", "kill-at:4",
                           *map(str, run_args(built, four_prompts, out, "--save-every", 2))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    logged = metrics.read_text().count("\n")
    last_checkpoint = runs.latest_checkpoint(out)
    saved = int(last_checkpoint.name.split("-")[1])
    assert (logged, saved) == (3, 2)  # the kill left a step logged past the checkpoint: the case under test
    r = cli(*run_args(built, four_prompts, out, "--resume", "--max-steps", logged + 1, "--save-every", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, logged + 2))
    sample_steps = [json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sample_steps == [s for s in steps for _ in range(2)]  # --num-samples 2 per step, each step once


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_skips_a_broken_checkpoint(built, four_prompts, tmp_path, damage):
    out = tmp_path / "run"
    assert cli(*run_args(built, four_prompts, out, "--max-steps", 2, "--save-every", 1)).returncode == 0
    state = out / "checkpoint-2" / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2] if damage == "truncated" else b"")
    r = cli(*run_args(built, four_prompts, out, "--resume", "--max-steps", 3, "--save-every", 1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{out / 'checkpoint-2'} is broken" in r.stderr and "resumed from" in r.stdout
    assert "checkpoint-1 after step 1" in r.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    for c in out.glob("checkpoint-*"):
        (c / "training_state.pt").write_bytes(b"")
    r = cli(*run_args(built, four_prompts, out, "--resume", "--max-steps", 4))
    assert r.returncode == 2
    last_line_error(r.stderr, "--resume: no intact checkpoint")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(built, four_prompts, tmp_path, monkeypatch, capsys):
    """The second checkpoint's training state hits ENOSPC halfway: one line, the temporary folder gone,
    checkpoint-1 intact and loadable."""
    from transformers import AutoModelForCausalLM

    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)):  # files only (RNG states also pass through memory buffers)
            calls.append(f)
        if len(calls) == 2 and f == calls[-1]:
            Path(f).write_bytes(b"\x00" * 100)  # half-written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    assert T.main([str(a) for a in run_args(built, four_prompts, out, "--max-steps", 3, "--save-every", 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and f"{out / 'checkpoint-1'} is intact" in err
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-2").exists()
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    assert torch.load(out / "checkpoint-1" / "training_state.pt", weights_only=True)["step"] == 1


def test_out_that_is_a_file_and_a_binary_judge_template(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert T.main(["--out", str(a_file), "--prompts", "never-read.jsonl"]) == 2
    one_line_error(capsys, f"--out {a_file} is a file")
    assert a_file.read_text() == "mine"
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"index": 0, "instruction": "i", "output": "o", "generator": "a"}) + "\n")
    template = tmp_path / "template.txt"
    template.write_bytes(b"\xff\xfe\x00\x01 binary")
    assert E.main(["judge", str(a), str(a), "--judge", "hf:x", "--out", str(tmp_path / "j.jsonl"), "--template",
                   str(template)]) == 2
    one_line_error(capsys, f"{template}: not UTF-8 text")


# --- a full disk at every writer --------------------------------------------------------------------------

def enospc_on_open(monkeypatch, where: str, nth: int) -> list:
    """Make the nth opening for writing of a file whose path contains `where` fail as a full disk does:
    OSError ENOSPC from open() itself."""
    import builtins
    import io

    real_open, seen = builtins.open, []

    def full(file, mode="r", *args, **kwargs):
        path = Path(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else None
        if path is not None and any(c in mode for c in "wax") and where in path.as_posix():
            seen.append(path)
            if len(seen) == nth:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", full)
    monkeypatch.setattr(io, "open", full)
    return seen


@pytest.mark.parametrize("writer,nth,what,intact", [
    ("config.json", 1, "config.json", None),
    ("metrics.jsonl", 2, "metrics.jsonl", "checkpoint-1"),
    ("samples.jsonl", 2, "samples.jsonl", "checkpoint-1"),
    ("tokenizer", 2, "checkpoint-2 (tokenizer)", "checkpoint-1"),
    ("weights", 2, "checkpoint-2 (model weights)", "checkpoint-1"),
    ("curves.png", 1, "curves.png", "checkpoint-3")])
def test_a_full_disk_at_each_writer_is_one_line_and_keeps_the_checkpoint(built, four_prompts, tmp_path, monkeypatch,
                                                                         capsys, writer, nth, what, intact):
    """Each write a run makes, failing as a full disk fails (the OS's ENOSPC from open(); the safetensors
    writer's own error, a plain Exception from Rust): one line naming what could not be written and the
    checkpoint that is intact, no temporary folder left, exit 2."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    import transformers.modeling_utils as modeling_utils

    if writer == "weights":
        real, calls = modeling_utils.safe_save_file, []

        def save_file(*a, **kw):
            calls.append(1)
            if len(calls) == nth:
                raise SafetensorError("No space left on device (os error 28)")
            return real(*a, **kw)
        monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
    else:
        enospc_on_open(monkeypatch, ".tmp-checkpoint-2/tokenizer" if writer == "tokenizer" else f"run/{writer}",
                       nth if writer != "tokenizer" else 1)
    out = tmp_path / "run"
    code = T.main([str(a) for a in run_args(built, four_prompts, out, "--max-steps", 3, "--save-every", 1,
                                            "--keep-checkpoints", 5)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: cannot write ") and "Traceback" not in "\n".join(err), err[-5:]
    assert what in err[-1] and "No space left on device" in err[-1]
    assert (f"{out / intact} is intact" if intact else "no checkpoint was written before") in err[-1]
    assert not list(out.glob(".tmp-*"))
    if intact:
        AutoModelForCausalLM.from_pretrained(out / intact)
        assert torch.load(out / intact / "training_state.pt", weights_only=True)["step"] == int(intact.split("-")[1])


SWEEP = r"""
import contextlib, io, json, math, os, subprocess, sys, traceback
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import train as T
mnt, args = Path(sys.argv[2]), json.loads(sys.argv[3])
PAGE = os.sysconf("SC_PAGE_SIZE")

def run(name, free_pages):
    d = mnt / name
    d.mkdir()  # a tmpfs holds at least one page: one more, taken by a filler, lets free_pages be 0
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(free_pages + 1) * PAGE // 1024}k", "tmpfs", str(d)],
                   check=True)
    (d / "filler").write_bytes(b"x" * PAGE)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = T.main([*args, "--out", str(d / "run")])
    except BaseException:
        code = "crash: " + traceback.format_exc()
    return d / "run", code, err.getvalue()

# a run on a disk it fits: the files it writes, in the order written, with the pages each takes
out, code, err = run("ref", 64 * 1024)
assert code == 0, (code, err[-2000:])
files = sorted((p.stat().st_mtime_ns, p) for p in out.rglob("*") if p.is_file())
pages = [(str(p.relative_to(out)), math.ceil(p.stat().st_size / PAGE)) for _, p in files]
# one disk per file: full before it (no room for its first page), or halfway through it
before, sizes = 0, []
for name, n in pages:
    for k in sorted({0, n // 2}):
        sizes.append((name, before + k))
    before += n
results = []
for i, (name, free) in enumerate(sizes):
    _, code, err = run(f"s{i}", free)
    results.append({"file": name, "free_pages": free, "code": code, "err": err.strip().splitlines()[-3:] if err.strip() else []})
print(json.dumps({"pages": pages, "results": results}))
"""


def test_a_real_full_disk_at_every_writer_is_one_line(built, four_prompts, tmp_path):
    """train.py on real filesystems that fill at each writer of a run in turn: one tmpfs per size, in a
    private mount namespace, sized from a run that fits so that the disk is full just before, or
    halfway through, each file the run writes (config, logs, samples, the tracker, each file of the
    checkpoint, the curves). Every size ends in exit 0, or exit 2 with one line naming what could not
    be written, never a traceback."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private tmpfs")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here ({probe.stderr.decode().strip()[:80]})")
    extra = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    args = [str(a) for a in run_args(built, four_prompts, "unused", "--max-steps", 1, "--save-every", 1, *extra)]
    args = args[:args.index("--out")] + args[args.index("--out") + 2:]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "sweep.py").write_text(SWEEP)
    r = subprocess.run(["unshare", "-m", sys.executable, str(tmp_path / "sweep.py"), str(ROOT), str(mnt),
                        json.dumps(args)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    named = set()
    for res in found["results"]:
        assert res["code"] in (0, 2), res
        if res["code"] == 2:
            last = res["err"][-1]
            assert last.startswith("error: cannot write ") and " left on its disk" in last, res
            assert not any("Traceback" in x for x in res["err"]), res
            named.add(last.split("error: cannot write ", 1)[1].split(":")[0])
    written = {name for name, _ in found["pages"]}
    assert {"config.json", "metrics.jsonl", "samples.jsonl", "curves.png"} <= written, written
    # the sweep reached every writer: each is named by some size (the tracker's failure is a warning only)
    kinds = {"config.json", "metrics.jsonl", "samples.jsonl", "(model weights)", "(tokenizer)", "(training state)",
             "curves.png"}
    reached = {k for k in kinds if any(n.endswith(k) for n in named)}
    assert reached == kinds, (kinds - reached, named)


def test_the_rng_state_keeps_only_the_sampling_gpus_generator(monkeypatch):
    """A rank saves and restores the CUDA generator of the GPU it samples on, not every visible GPU's by
    ordinal (a resume under another CUDA_VISIBLE_DEVICES layout would give it another GPU's stream, or
    fail on a count mismatch). No GPU here: torch.cuda's generator functions are stood in for, the
    rest is the real code."""
    gens = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gens[torch.device(device).index].clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [g.clone() for g in gens.values()])

    def set_state(state, device="cuda"):
        gens[torch.device(device).index] = state.clone()
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every GPU"))
    saved = runs.rng_state(torch.device("cuda", 1))
    assert torch.equal(saved["cuda"], torch.tensor([1], dtype=torch.uint8))   # its own GPU's state only
    gens[0], gens[1] = torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)
    runs.set_rng_state(saved, torch.device("cuda", 0))  # resumed on another ordinal: that GPU gets it
    assert gens[0].item() == 1 and gens[1].item() == 8
    assert "cuda" not in runs.rng_state(torch.device("cpu"))


def test_a_crash_between_the_renames_of_an_overwrite_keeps_the_checkpoint(built, tmp_path, monkeypatch):
    """save_checkpoint over an existing checkpoint-N (a final save after a re-resume) renames the old one
    aside, then the new one in. Killed between the two renames, only `.old-checkpoint-N` is on disk: the
    next resume finds it as checkpoint-N, intact."""
    model, tok, gen_config, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = tmp_path / "run"
    out.mkdir()
    runs.save_checkpoint(out, "checkpoint-2", model, tok, gen_config, opt, sched, 2, {"seed": 0})
    renames, real_rename = [], Path.rename

    def killed_at_the_second(self, target):
        renames.append(target)
        if len(renames) == 2:  # checkpoint-2 -> .old-checkpoint-2 done; .tmp-checkpoint-2 -> checkpoint-2 next
            raise KeyboardInterrupt("killed")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(out, "checkpoint-2", model, tok, gen_config, opt, sched, 2, {"seed": 0})
    monkeypatch.undo()
    assert not (out / "checkpoint-2").exists() and (out / ".old-checkpoint-2").exists()
    path, state = runs.intact_checkpoint(out)
    assert path == out / "checkpoint-2" and state["step"] == 2 and not (out / ".old-checkpoint-2").exists()
    runs.save_checkpoint(out, "checkpoint-2", model, tok, gen_config, opt, sched, 2, {"seed": 0})
    (out / ".old-checkpoint-2").mkdir()  # killed after the second rename: the leftover goes
    assert runs.intact_checkpoint(out)[0] == out / "checkpoint-2" and not (out / ".old-checkpoint-2").exists()


def test_an_outputs_file_with_a_repeated_index_is_refused(tmp_path):
    path = tmp_path / "outs.jsonl"
    rows = [{"index": 3, "instruction": "a", "output": "x"}, {"index": 4, "instruction": "b", "output": "y"},
            {"index": 3, "instruction": "a", "output": "z"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"outs.jsonl: record 3 repeats index 3 of record 1"):
        R.read_outputs(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert sorted(R.read_outputs(path)) == [3, 4]
