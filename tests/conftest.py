"""Shared test material, built here so the tests need nothing downloaded.

Tokenizers are trained with `tokenizers` on a small multilingual corpus, saved with save_pretrained
and loaded back with AutoTokenizer.from_pretrained, the path users take:
  - "bytebpe":  byte-level BPE with a ChatML chat template and a non-special added token (Qwen-like);
  - "sp_llama": SentencePiece-style BPE with byte fallback, dummy prefix and a leading-space Strip
                decoder, no chat template (Llama-2-like);
  - "sp_gemma": SentencePiece-style BPE with byte fallback, no dummy prefix, no Strip, and a Gemma
                chat template (Gemma-3-like).
Tiny random-init models (Qwen2, Gemma3 with logit soft-capping, Llama) are saved and reloaded the same way.
Real tokenizers from ../shared/tokenizers are used where that folder exists, and the real small models
that ../shared/models/build_real_models.py builds (SmolLM2-135M-Instruct, gemma-3-270m) where they are
built: `$CME_REAL_MODELS`, default ~/.cache/cme-grpo/real-models (.ci/run builds them when
../shared/models exists). Tests needing either skip cleanly elsewhere.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N workers, one thread each (and their subprocesses):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # OpenMP teams of several threads per worker spin-wait against
    os.environ.setdefault("MKL_NUM_THREADS", "1")  # each other on a few cores (12x slower measured on 2 cores)

import tiny  # noqa: E402  (the tokenizer and model builders; needs ROOT on sys.path)

SHARED = ROOT.parent / "shared"
REAL_TOKENIZERS = ["qwen2.5", "llama-3.2", "llama-2", "mistral-7b-v0.1", "gemma-3", "smollm2"]
REAL_MODELS = Path(os.environ.get("CME_REAL_MODELS", Path.home() / ".cache/cme-grpo/real-models"))

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}",
    "中文文本测试，这是一个句子。我们喜欢学习语言。",
    "日本語のテキストです。東京は大きい都市です。",
    "مرحبا بالعالم، هذه جملة عربية قصيرة.",
    "Emoji: 😀 😂 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and café, naïve, résumé, e\u0301.",
    "Math: ∑ x² ≤ ∞, α β γ; prices: $5.99, €10, £3.",
    "Lists:\n- one\n- two\n\n1. first\n2. second\n",
    "unhappiness happiness unhappy kindness darkness sadness",
    "   leading spaces, trailing spaces   \n\n\n   and tabs\t\there.",
]



def _corpus(repeat: int = 20):
    return [line for _ in range(repeat) for line in CORPUS]


def build_bytebpe(path: Path) -> Path:
    return tiny.build_bytebpe(path, _corpus())


def build_sentencepiece(path: Path, gemma: bool) -> Path:
    return tiny.build_sentencepiece(path, _corpus(), gemma=gemma)


build_model = tiny.build_model  # noqa: E305


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Paths of the tiny tokenizers and models, built once per test session."""
    d = tmp_path_factory.mktemp("built")
    paths = {
        "bytebpe": build_bytebpe(d / "bytebpe"),
        "sp_llama": build_sentencepiece(d / "sp_llama", gemma=False),
        "sp_gemma": build_sentencepiece(d / "sp_gemma", gemma=True),
    }
    paths["qwen2"] = build_model(d / "qwen2", paths["bytebpe"], "qwen2")
    paths["gemma3"] = build_model(d / "gemma3", paths["sp_gemma"], "gemma3")
    paths["llama"] = build_model(d / "llama", paths["sp_llama"], "llama")
    return paths


@pytest.fixture(scope="session")
def tokenizers(built):
    """name -> loaded tokenizer, for the three tiny ones and the real ones present in ../shared."""
    from transformers import AutoTokenizer

    toks = {name: AutoTokenizer.from_pretrained(built[name]) for name in ("bytebpe", "sp_llama", "sp_gemma")}
    for name in REAL_TOKENIZERS:
        if (SHARED / "tokenizers" / name).is_dir():
            toks[name] = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / name)
    return toks


def in_process(main, *args) -> "subprocess.CompletedProcess":
    """A command's `main(argv)` run in this process, with its exit code, stdout and stderr as
    subprocess.run gives them: the same code path less an interpreter start (seconds per call)."""
    import contextlib
    import io
    import subprocess

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse, and commands that exit with a message
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=err)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def real_tokenizer(name: str):
    """A real tokenizer from ../shared/tokenizers, or skip the test where that folder is absent."""
    from transformers import AutoTokenizer

    path = SHARED / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (test data only in the development checkout)")
    return AutoTokenizer.from_pretrained(path)


def real_model(name: str) -> Path:
    """The folder of a real small model ("smollm2-135m-instruct", "gemma-3-270m"), or skip the test."""
    path = REAL_MODELS / name
    if not (path / "model.safetensors").exists():
        pytest.skip(f"{path} not built (python ../shared/models/build_real_models.py; development checkout only)")
    return path


@pytest.fixture(scope="session")
def four_prompts(tmp_path_factory) -> Path:
    """A .jsonl of four short distinct prompts, for runs through the CLI."""
    import json
    path = tmp_path_factory.mktemp("four_prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": p}) + "\n"
                            for p in ["Say hello.", "Count to three.", "Name a colour.", "Write a haiku."]))
    return path


# The longest tests first (their measured order on a 2-core CPU): `pytest -n 2` hands tests out as
# workers free up, so a long test collected last would run alone at the end while the other worker
# idles. The order changes no result.
LONGEST_FIRST = ("test_demo_raises_the_ground_truth", "test_shared_opening_in_bf16_is_exact",
                 "test_real_command_on_the_real_small_models", "test_a_stop_under_torchrun",
                 "test_a_real_full_disk_at_every_writer", "test_table1_interrupted_and_rerun",
                 "test_ranks_resume_the_checkpoint_rank_0_chose", "test_a_resumed_two_rank_run_continues_exactly",
                 "test_one_cme_grpo_run_through_the_cli", "test_reference_without_a_second_copy_merge",
                 "test_two_ranks_equal_one_process_on_the_same_rollouts", "test_figure3_and_table2_share_a_folder",
                 "test_a_dying_rank_leaves_the_newest_complete_step", "test_two_steps_on_the_real_small_models",
                 "test_evaluate_generate_equals_one_prompt_at_a_time", "test_ctrl_c_stops_at_a_step_boundary",
                 "test_a_group_split_over_two_processes", "test_fast_mode_prints_the_table_and_a_verdict",
                 "test_a_run_longer_than_one_epoch", "test_resume_after_a_kill_logs_each_step_once",
                 "test_bf16_rollout_copy_follows_the_policy", "test_sequence_cme_equals_hf_forward_with_labels",
                 "test_a_failing_rank_ends_the_job_in_seconds", "test_fast_mode_end_to_end_then_a_rerun",
                 "test_two_step_smoke_run_through_the_cli", "test_a_changed_setting_on_a_started_run",
                 "test_resume_continues_exactly", "test_a_huge_prompt_is_skipped_before_any_work",
                 "test_a_wordpiece_generator_is_refused")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: next((i for i, name in enumerate(LONGEST_FIRST) if item.name.startswith(name)),
                                     len(LONGEST_FIRST)))
