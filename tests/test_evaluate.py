"""evaluate.py and judge.py: verdict parsing, the HTTP judge against a real local server, resume after a kill, a tiny
local HF judge, generation with resume, the CME diagnostic, and the report's statistics (on the real
AlpacaEval verdicts where ../shared has them, and against slow oracles everywhere)."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, SHARED

import cme as C
import evaluate as E
import judge as J
import records as R
import report as W

VERDICTS_DIR = SHARED / "data" / "alpaca_eval" / "verdicts"


# --- verdict parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, label", [
    ("Response A answers the question directly.\nVerdict: A", "A"),
    ("B is more accurate.\nverdict: b", "B"),                                   # lower case
    ("Both are equally good.\nVERDICT: Tie.", "tie"),
    ("A cites sources.\n**Verdict:** A", "A"),                                 # markdown
    ("Clearer.\nVerdict: [[B]]", "B"),                                         # brackets
    ("Clearer.\nFinal verdict: Response B", "B"),
    ("Clearer.\nVerdict: A (more detailed)\n\nI hope this helps!", "A"),       # extra text after
    ('One would expect "Verdict: B" here, yet A is right.\nVerdict: A', "A"),  # quoted label in the sentence
    ('Unlike B ("Verdict: A" is what it says), A is wrong.\nVerdict: B', "B"),
    ("Verdict: A\nOn reflection B is better.\nVerdict: B", "B"),              # the last one counts
    ("Both are fine.\nVerdict: a tie", "tie"),
    ("Response A is better.", None),                                            # no verdict line
    ("Verdict: both", None),
    ("Verdict: undecided", None),
    ("", None),
])
def test_parse_verdict(answer, label):
    assert J.parse_verdict(answer)[0] == label


def test_justification_is_the_text_before_the_verdict():
    assert J.parse_verdict("  A is concise and correct.\nVerdict: A\n") == ("A", "A is concise and correct.")
    assert J.parse_verdict("Verdict: A\nOn reflection B.\n**Verdict:** B") == ("B", "Verdict: A\nOn reflection B.")
    assert J.parse_verdict("No idea.\n") == (None, "No idea.")


def test_candidate_verdict_follows_the_order():
    assert [E.candidate_verdict(x, False) for x in ("A", "B", "tie", None)] == ["win", "loss", "tie", "error"]
    assert [E.candidate_verdict(x, True) for x in ("A", "B", "tie", None)] == ["loss", "win", "tie", "error"]


def test_order_is_stable_across_processes_and_balanced():
    code = ("import evaluate as E; print(''.join('1' if E.is_swapped(f'prompt {i}', r, 0) else '0' "
            "for i in range(40) for r in range(3)))")
    runs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout for s in (1, 2)}
    assert len(runs) == 1  # Python's hash() would differ between these two processes
    flips = [E.is_swapped(f"prompt {i}", r, 0) for i in range(2000) for r in range(5)]
    assert 0.47 < np.mean(flips) < 0.53
    assert any(E.is_swapped(f"prompt {i}", 0, 0) != E.is_swapped(f"prompt {i}", 1, 0) for i in range(10))
    assert any(E.is_swapped(f"prompt {i}", 0, 0) != E.is_swapped(f"prompt {i}", 0, 1) for i in range(10))


def test_judge_prompt_keeps_braces():
    p = J.judge_prompt(J.JUDGE_TEMPLATE, "Write {x} in C", "int f() { return 1; }", "{response_a}")
    assert "Write {x} in C" in p and "int f() { return 1; }" in p and p.count("{response_a}") == 1


@pytest.mark.parametrize("spec, error", [
    ("gpt-4o", "expected 'api:MODEL"),
    ("hf:./judge?temperature=0", "unknown option 'temperature'"),
    ("api:", "expected 'api:MODEL"),
    ("api:m?temperature", "options must read key=value"),
])
def test_bad_judge_specs(spec, error):
    with pytest.raises(ValueError, match=error):
        J.JudgeSpec.parse(spec)


def test_judge_spec_sends_only_what_is_set():
    s = J.JudgeSpec.parse("api:gpt-5.2?base=http://x/v1&key=MY_KEY&temperature=0&reasoning_effort=low&timeout=5")
    assert (s.model, s.name, s.params) == ("gpt-5.2", "gpt-5.2", {"temperature": 0, "reasoning_effort": "low"})
    assert s.options == {"base": "http://x/v1", "key": "MY_KEY", "timeout": 5}
    assert J.JudgeSpec.parse("api:gpt-5.2").params == {}


# --- a real chat-completions server on 127.0.0.1 -------------------------------------------------------

class ChatServer:
    """An OpenAI-compatible /v1/chat/completions endpoint on a free local port, driven by `behave`.

    behave(call_number, request_json) -> (status, body bytes or dict, delay seconds, headers dict).
    Every request is recorded with its headers, in arrival order.
    """

    def __init__(self, behave):
        self.behave, self.calls, self.lock = behave, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    n = len(server.calls)
                status, payload, delay, headers = server.behave(n, body)
                time.sleep(delay)
                data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(text):
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": text}, "finish_reason": "stop"}]}


@pytest.fixture
def server():
    servers = []

    def start(behave):
        servers.append(ChatServer(behave))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def client(srv, **kw):
    kw = {"timeout": 5.0, "retries": 3, "backoff": 0.01, **kw}
    return J.ChatClient(srv.base, "judge-model", **kw)


def test_http_429_then_success(server, monkeypatch):
    monkeypatch.setenv("CME_TEST_KEY", "sk-test-secret-123")
    srv = server(lambda n, body: (429, {"error": {"message": "slow down"}}, 0, {"Retry-After": "0"}) if n == 1
                 else (200, reply("Fine.\nVerdict: A"), 0, {}))
    c = client(srv, key_env="CME_TEST_KEY", params={"temperature": 0})
    assert c.complete([{"role": "user", "content": "hi"}]) == "Fine.\nVerdict: A"
    assert len(srv.calls) == 2 and srv.calls[0]["path"] == "/v1/chat/completions"
    body = srv.calls[1]["body"]
    assert body == {"model": "judge-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    assert srv.calls[1]["headers"]["Authorization"] == "Bearer sk-test-secret-123"
    assert "sk-test" not in repr(c)


def test_http_only_the_parameters_set_are_sent(server):
    srv = server(lambda n, body: (200, reply("Verdict: tie"), 0, {}))
    client(srv).complete([{"role": "user", "content": "hi"}])
    assert set(srv.calls[0]["body"]) == {"model", "messages"} and "Authorization" not in srv.calls[0]["headers"]


def test_http_500_is_retried_then_fails(server):
    srv = server(lambda n, body: (500, {"error": "boom"}, 0, {}))
    with pytest.raises(J.JudgeError, match="HTTP 500, still after 4 attempts"):
        client(srv, retries=3).complete([{"role": "user", "content": "hi"}])
    assert len(srv.calls) == 4


def test_http_500_then_success(server):
    srv = server(lambda n, body: (503, b"unavailable", 0, {}) if n <= 2 else (200, reply("Verdict: B"), 0, {}))
    assert client(srv).complete([{"role": "user", "content": "hi"}]) == "Verdict: B"
    assert len(srv.calls) == 3


def test_http_malformed_body(server):
    srv = server(lambda n, body: (200, b"<html>gateway</html>", 0, {}) if n == 1 else (200, reply("Verdict: A"), 0, {}))
    assert client(srv).complete([{"role": "user", "content": "x"}]) == "Verdict: A"
    assert len(srv.calls) == 2
    srv2 = server(lambda n, body: (200, {"choices": []}, 0, {}))
    with pytest.raises(J.JudgeError, match="malformed reply body"):
        client(srv2, retries=2).complete([{"role": "user", "content": "x"}])
    assert len(srv2.calls) == 3


def test_http_slow_reply_past_the_timeout(server):
    """The first reply is held back (released after 120 s, answering B): a client that gave up on it at
    its 0.3 s timeout has A from its second try; one that waited it out has B."""
    held = threading.Event()
    release = threading.Timer(120, held.set)
    release.start()

    def behave(n, body):
        if n == 1:
            held.wait()
            return 200, reply("Verdict: B"), 0, {}
        return 200, reply("Verdict: A"), 0, {}
    srv = server(behave)
    try:
        assert client(srv, timeout=0.3).complete([{"role": "user", "content": "x"}]) == "Verdict: A"
        assert len(srv.calls) == 2
    finally:
        release.cancel()
        held.set()


def test_http_client_errors_are_not_retried_and_never_show_the_key(server, monkeypatch):
    monkeypatch.setenv("CME_TEST_KEY", "sk-test-secret-123")
    srv = server(lambda n, body: (400, {"error": {"message": "temperature is not supported; key sk-test-secret-123"}},
                                  0, {}))
    with pytest.raises(J.JudgeError, match="HTTP 400") as e:
        client(srv, key_env="CME_TEST_KEY").complete([{"role": "user", "content": "x"}])
    assert len(srv.calls) == 1 and "sk-test-secret-123" not in str(e.value) and "***" in str(e.value)


def test_missing_key_variable_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("CME_TEST_KEY_UNSET", raising=False)
    with pytest.raises(ValueError, match="environment variable CME_TEST_KEY_UNSET .* is not set"):
        J.ChatClient("http://127.0.0.1:9/v1", "m", key_env="CME_TEST_KEY_UNSET")


# --- judge runs through the CLI: resume after a kill ---------------------------------------------------

def outputs_file(path: Path, generator: str, texts: list[str], instructions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"index": i, "instruction": q, "output": t, "generator": generator}) + "\n"
                            for i, (q, t) in enumerate(zip(instructions, texts))), encoding="utf-8")
    return path


def deterministic_judge(n, body):
    """A judge whose answer depends only on what it is shown (so reruns agree), a little slow."""
    prompt = body["messages"][0]["content"]
    if "NOVERDICT" in prompt:
        return 200, reply("I cannot decide between these two."), 0.02, {}
    h = hashlib.sha256(prompt.encode()).digest()[0]
    verdict = "A" if h % 5 < 2 else "B" if h % 5 < 4 else "tie"
    return 200, reply(f"One of them is better.\nVerdict: {verdict}"), 0.05, {}


@pytest.fixture
def pair_files(tmp_path):
    instructions = [f"Question {i}: explain topic {i}." for i in range(12)] + ["NOVERDICT please"]
    cand = outputs_file(tmp_path / "cand.jsonl", "model-c", [f"Answer {i} from C." * (1 + i % 3) for i in range(12)]
                        + ["c"], instructions)
    opp_texts = [f"Answer {i} from O." for i in range(12)] + ["o"]
    opp_texts[5] = f"Answer 5 from C." * (1 + 5 % 3)  # identical to the candidate's: a tie with no call
    opp = outputs_file(tmp_path / "opp.jsonl", "model-o", opp_texts, instructions)
    return cand, opp


def sigint_as_in_a_terminal():
    """preexec_fn: SIGINT back to its default in the child. A job a shell starts in the background
    (`bash .ci/run &`) inherits SIGINT ignored, and a Python started so never raises KeyboardInterrupt:
    the Ctrl-C tests failed every time they ran that way, and passed in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def judge_cli(srv, cand, opp, out, replicates=3, **popen):
    spec = f"api:judge-model?base={srv.base}&key=CME_TEST_KEY&temperature=0&concurrency=2&backoff=0.01"
    args = [sys.executable, "evaluate.py", "judge", cand, opp, "--judge", spec, "--replicates", replicates,
            "--out", out, "--verdict-tries", 2]
    env = {**os.environ, "CME_TEST_KEY": "sk-test-secret-123"}
    return subprocess.Popen(list(map(str, args)), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_as_in_a_terminal, **popen)


def test_judge_resumes_after_a_kill_without_asking_twice(server, pair_files, tmp_path):
    cand, opp = pair_files
    release = threading.Event()

    def behave(n, body):  # the first run's 9th and 10th requests are held until it is killed: it cannot finish
        if n > 8:
            release.wait()
        return deterministic_judge(n, body)
    srv = server(behave)
    out = tmp_path / "judgments.jsonl"
    try:
        proc = judge_cli(srv, cand, opp, out)
        # 8 calls answer at least 5 judgments (the verdict-less prompt takes 2), after the 3 ties of the identical pair
        while proc.poll() is None and (len(srv.calls) < 10 or not out.exists() or out.read_text().count("\n") < 8):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        release.set()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed midway"
    first = R.read_jsonl(out, partial_tail_ok=True)
    calls_first = len(srv.calls)
    assert 8 <= len(first) < 39

    # What the rerun must ask: each judgment not yet recorded, once (twice for the verdict-less prompt).
    recorded = {(r["index"], r["replicate"]) for r in first}
    expected_calls = sum((2 if i == 12 else 1) for i in range(13) for rep in range(3)
                         if (i, rep) not in recorded and i != 5)
    proc = judge_cli(srv, cand, opp, out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert len(srv.calls) - calls_first == expected_calls
    records = R.read_jsonl(out)
    assert sorted((r["index"], r["replicate"]) for r in records) == [(i, rep) for i in range(13) for rep in range(3)]

    proc = judge_cli(srv, cand, opp, out)  # a third run has nothing left to ask
    proc.communicate(timeout=60)
    assert len(srv.calls) - calls_first == expected_calls

    # The same numbers as an uninterrupted run.
    whole = tmp_path / "whole.jsonl"
    proc = judge_cli(srv, cand, opp, whole)
    stdout2, stderr2 = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert W.compute_report(W.load_judgments([out])) == W.compute_report(W.load_judgments([whole]))
    by_key = {r["key"]: r["verdict"] for r in R.read_jsonl(whole)}
    assert {r["key"]: r["verdict"] for r in records} == by_key

    # Identical outputs are ties with no call; the verdict-less prompt is an error, out of N, counted.
    assert all(r["verdict"] == "tie" and r["raw"] is None for r in records if r["index"] == 5)
    assert not any("Answer 5 from C" in c["body"]["messages"][0]["content"] and
                   "Answer 5 from O" not in c["body"]["messages"][0]["content"] for c in srv.calls)
    assert all(r["verdict"] == "error" for r in records if r["index"] == 12)
    row = W.compute_report(records)["win_rates"][0]
    assert (row["n"], row["errors"]) == (12, 3)
    for text in [stdout, stderr, stdout2, stderr2, out.read_text(), whole.read_text()]:
        assert "sk-test-secret-123" not in text
    assert all(c["headers"]["Authorization"] == "Bearer sk-test-secret-123" for c in srv.calls)
    assert all(set(c["body"]) == {"model", "messages", "temperature"} for c in srv.calls)
    assert not any(name in json.dumps(c["body"]) for c in srv.calls for name in ("model-c", "model-o"))


def test_judge_stops_cleanly_when_the_service_stays_down(server, pair_files, tmp_path):
    cand, opp = pair_files
    srv = server(lambda n, body: (503, b"down", 0, {}))
    proc = judge_cli(srv, cand, opp, tmp_path / "j.jsonl", replicates=1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1].startswith("error: ") and "HTTP 503" in stderr and "rerun" in stderr


def test_ctrl_c_ends_a_judge_run_at_once(server, pair_files, tmp_path):
    """Ctrl-C with two requests in flight that are never answered: the run ends (130), keeping what was
    answered. A run that waited for its requests would never end, so no clock decides the outcome: the
    signal is sent once the server holds both requests, and the timeout only bounds a hang."""
    cand, opp = pair_files
    release = threading.Event()

    def behave(n, body):
        if n > 4:
            release.wait()
        return 200, reply("Verdict: A"), 0, {}
    srv = server(behave)
    out = tmp_path / "j.jsonl"
    try:
        proc = judge_cli(srv, cand, opp, out, replicates=1)
        while len(srv.calls) < 6 and proc.poll() is None:  # four answered, two held
            time.sleep(0.01)
        assert len(srv.calls) == 6, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        release.set()
    assert proc.returncode == 130, stderr[-2000:]
    assert "rerun the same command to continue" in stderr
    assert len(R.read_jsonl(out)) == 4 + 1  # the four answered, and the identical pair's tie


FINALIZER_CTRL_C = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from judge import JudgeSpec, make_judge

class Finalized:
    def __del__(self):  # Ctrl-C arriving while the garbage collector runs a finalizer
        os.kill(os.getpid(), signal.SIGINT)

judge = make_judge(JudgeSpec.parse(sys.argv[1]), 1)
answered = 0
try:
    for _ in judge.run([f"question {i}" for i in range(40)]):
        answered += 1
        if answered == 3:
            Finalized()  # dropped at once: its __del__ runs here
    print(f"finished after {answered}")
except KeyboardInterrupt:
    print(f"interrupted after {answered}")
"""


def test_ctrl_c_inside_a_finalizer_still_ends_a_judge_run(server):
    """Python raises KeyboardInterrupt wherever the main thread is; inside a finalizer it is printed and
    lost, and the run went on to the end. The judge loop sets a flag instead and stops at the next answer."""
    srv = server(lambda n, body: (200, reply("Verdict: A"), 0, {}))
    spec = f"api:judge-model?base={srv.base}&temperature=0&concurrency=1"
    run = subprocess.run([sys.executable, "-c", FINALIZER_CTRL_C, spec, str(ROOT)], capture_output=True, text=True,
                         timeout=300, preexec_fn=sigint_as_in_a_terminal)
    assert run.stdout.strip() == "interrupted after 3", run.stdout + run.stderr[-2000:]


def test_partial_last_line_is_cut_before_appending(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"a": 1}\n{"b": ')
    assert R.read_jsonl(path, partial_tail_ok=True) == [{"a": 1}]
    with pytest.raises(ValueError, match=r"j.jsonl:2: not valid JSON"):
        R.read_jsonl(path)
    with R.open_for_append(path) as f:
        R.write_record(f, {"c": 3})
    assert R.read_jsonl(path) == [{"a": 1}, {"c": 3}]


# --- statistics ----------------------------------------------------------------------------------------

def test_bootstrap_is_seeded_and_resamples_prompts_not_replicates():
    rng = np.random.default_rng(1)
    per_prompt = rng.choice([0.0, 0.5, 1.0], size=300)
    assert W.bootstrap_ci(per_prompt) == W.bootstrap_ci(per_prompt)
    low, high = W.bootstrap_ci(per_prompt)
    assert low < per_prompt.mean() < high

    def records(reps):  # the same per-prompt verdict repeated `reps` times: replicates that agree
        v = {1.0: "win", 0.5: "tie", 0.0: "loss"}
        return [{"index": i, "replicate": r, "verdict": v[s], "swapped": False, "raw": "x", "len_candidate": 1,
                 "len_opponent": 2} for i, s in enumerate(per_prompt) for r in range(reps)]
    one, five = W.win_rate_row(records(1), 2000, 0), W.win_rate_row(records(5), 2000, 0)
    assert (one["ci_low"], one["ci_high"], one["n"]) == (five["ci_low"], five["ci_high"], five["n"]) == \
        (one["ci_low"], one["ci_high"], 300)


record_strategy = st.fixed_dictionaries({
    "index": st.integers(0, 7), "replicate": st.integers(0, 2), "verdict": st.sampled_from(W.VERDICTS),
    "swapped": st.booleans(), "judge": st.sampled_from(["j1", "j2"]),
    "len_candidate": st.integers(0, 5), "len_opponent": st.integers(0, 5)})


@settings(max_examples=150, deadline=None)
@given(st.lists(record_strategy, min_size=1, max_size=40))
def test_report_statistics_match_slow_loops(raw):
    seen, records = set(), []
    for r in raw:  # one record per (judge, index, replicate); lengths belong to the prompt
        if (r["judge"], r["index"], r["replicate"]) not in seen:
            seen.add((r["judge"], r["index"], r["replicate"]))
            lc, lo = (r["index"] * 7) % 5, (r["index"] * 3) % 4
            records.append({**r, "key": f"{r['judge']}-{r['index']}-{r['replicate']}", "candidate": "c",
                            "opponent": "o", "raw": "answer", "len_candidate": lc, "len_opponent": lo})
    report = W.compute_report(records, resamples=200)
    for judge in ("j1", "j2"):
        mine = [r for r in records if r["judge"] == judge]
        row = [w for w in report["win_rates"] if w["judge"] == judge]
        if not mine:
            assert not row
            continue
        row = row[0]
        # win rate: per prompt, mean over valid replicates; then mean over prompts
        prompts = {}
        for r in mine:
            if r["verdict"] != "error":
                prompts.setdefault(r["index"], []).append({"win": 1, "tie": 0.5, "loss": 0}[r["verdict"]])
        expected = 100 * sum(sum(v) / len(v) for v in prompts.values()) / len(prompts) if prompts else math.nan
        assert (row["win_rate"] == pytest.approx(expected)) if prompts else math.isnan(row["win_rate"])
        assert row["n"] == len(prompts) and row["errors"] == sum(r["verdict"] == "error" for r in mine)
        first = [(r["verdict"] == "win" and not r["swapped"]) or (r["verdict"] == "loss" and r["swapped"])
                 for r in mine if r["verdict"] in ("win", "loss")]
        assert row["first_wins"] == (pytest.approx(100 * sum(first) / len(first)) if first else None)
        longer = [(r["verdict"] == "win") == (r["len_candidate"] > r["len_opponent"])
                  for r in mine if r["verdict"] in ("win", "loss") and r["len_candidate"] != r["len_opponent"]]
        assert row["longer_wins"] == (pytest.approx(100 * sum(longer) / len(longer)) if longer else None)


def test_majority_and_kappa_by_hand():
    assert W.majority_verdict(["win", "win", "loss"]) == "win"
    assert W.majority_verdict(["win", "loss", "tie"]) == "tie"          # all equal: score 1/2
    assert W.majority_verdict(["win", "win", "tie", "tie", "loss"]) == "win"  # win = tie in count, score 0.6
    assert W.majority_verdict(["loss", "error", "error"]) == "loss"
    # 10 items: agree on 7; marginals a = (6 win, 4 loss), b = (5, 5): p_e = 0.5, kappa = (0.7 - 0.5) / 0.5
    a = ["win"] * 6 + ["loss"] * 4
    b = ["win"] * 4 + ["loss"] * 2 + ["loss"] * 3 + ["win"]
    assert W.cohen_kappa(a, b) == pytest.approx(0.4)
    assert math.isnan(W.cohen_kappa(["win"] * 3, ["win"] * 3))


def synthetic(cand, opp, judge, scores, seed=0):
    """Judgment records with the given per-prompt verdict scores (one replicate)."""
    v = {1.0: "win", 0.5: "tie", 0.0: "loss"}
    return [{"key": f"{cand}-{opp}-{judge}-{i}", "index": i, "candidate": cand, "opponent": opp, "judge": judge,
             "replicate": 0, "swapped": bool((i + seed) % 2), "verdict": v[s], "raw": "x", "len_candidate": 10,
             "len_opponent": 20} for i, s in enumerate(scores)]


def test_table1_flips_orientation_and_computes_deltas():
    rng = np.random.default_rng(0)
    draws = {name: rng.choice([0.0, 0.5, 1.0], size=50, p=p) for name, p in
             [("base-cme", [0.6, 0.1, 0.3]), ("cme-inst", [0.5, 0.2, 0.3]), ("base-ref", [0.8, 0.1, 0.1]),
              ("cme-ref", [0.6, 0.1, 0.3]), ("inst-ref", [0.5, 0.2, 0.3]), ("inst-base", [0.2, 0.2, 0.6])]}
    records = []
    for name, s in draws.items():
        a, b = name.split("-")
        records += synthetic(a, b, "j1", s) + synthetic(a, b, "j2", s[::-1], seed=1)
    report = W.compute_report(records, resamples=200,
                              table1=[E.parse_table1("label=G,cme=cme,base=base,instruct=inst,ref=ref")])
    row = report["table1"][0]

    def wr(s):  # mean over the two judges of the tie-adjusted win rate
        return 100 * s.mean()
    assert row["CME vs Base"]["win_rate"] == pytest.approx(100 - wr(draws["base-cme"]))  # flipped
    assert row["CME vs Instruct"]["win_rate"] == pytest.approx(wr(draws["cme-inst"]))
    assert row["CME vs Ref"]["delta"] == pytest.approx(wr(draws["cme-ref"]) - wr(draws["base-ref"]))
    assert row["Instruct vs Base"]["win_rate"] == pytest.approx(wr(draws["inst-base"]))
    lo, hi = row["CME vs Base"]["ci_low"], row["CME vs Base"]["ci_high"]
    assert lo < row["CME vs Base"]["win_rate"] < hi


def test_report_formats_parse(tmp_path):
    path = tmp_path / "j.jsonl"
    records = synthetic("c", "o", "j1", [1.0, 0.0, 0.5, 1.0]) + synthetic("c", "o", "j2", [1.0, 1.0, 0.5, 0.0])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = {}
    for fmt in ("text", "markdown", "csv", "json"):
        r = subprocess.run([sys.executable, "evaluate.py", "report", str(path), "--format", fmt], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[fmt] = r.stdout
    data = json.loads(out["json"])
    assert [w["judge"] for w in data["win_rates"]] == ["j1", "j2", "mean of 2 judges"]
    assert data["win_rates"][0]["win_rate"] == pytest.approx(62.5) and data["agreement"][0]["n"] == 4
    rows = list(csv.reader(io.StringIO(out["csv"].split("\n\n")[0])))
    assert rows[0][:4] == ["candidate", "opponent", "judge", "win rate"] and rows[1][3] == "62.5"
    assert "| c | o | j1 | 62.5 |" in out["markdown"] and "62.5" in out["text"] and "Cohen's kappa" in out["text"]


def test_report_plot_draws_every_win_rate_with_its_interval(tmp_path):
    records = (synthetic("c", "o", "j1", [1.0, 0.0, 0.5, 1.0]) + synthetic("c", "o", "j2", [1.0, 1.0, 0.5, 0.0])
               + synthetic("c", "base", "j1", [1.0, 1.0, 1.0, 0.0]))
    report = W.compute_report(records, resamples=200)
    bars = W.plot_win_rates(report, tmp_path / "wr.png")
    drawn = {(b["candidate"], b["opponent"], b["judge"]): b for b in bars}
    assert drawn.keys() == {(w["candidate"], w["opponent"], w["judge"]) for w in report["win_rates"]}
    for w in report["win_rates"]:
        b = drawn[(w["candidate"], w["opponent"], w["judge"])]
        assert (b["win_rate"], b["ci_low"], b["ci_high"]) == (w["win_rate"], w["ci_low"], w["ci_high"])
        assert b["ci_low"] <= b["win_rate"] <= b["ci_high"]
    xs = [b["x"] for b in bars if b["opponent"] == "o"]  # one group: j1, j2 and their mean side by side
    assert len(xs) == 3 and len(set(xs)) == 3 and max(xs) - min(xs) < 1
    assert (tmp_path / "wr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = subprocess.run([sys.executable, "evaluate.py", "report", str(path), "--plot", str(tmp_path / "cli.png")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "cli.png").stat().st_size > 0, r.stderr
    r = subprocess.run([sys.executable, "evaluate.py", "report", str(path), "--plot", str(tmp_path / "x.pdf")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "name a .png file" in r.stderr


def test_report_bad_input_is_one_line(tmp_path):
    good = '{"key": "k", "index": 0, "candidate": "c", "opponent": "o", "judge": "j", "verdict": "win"}\n'
    (tmp_path / "bad.jsonl").write_text(good + "not json\n" + good)
    (tmp_path / "odd.jsonl").write_text(good + '{"key": "k2"}\n')
    (tmp_path / "good.jsonl").write_text(good)
    for args, message in [([str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
                          ([str(tmp_path / "odd.jsonl")], "odd.jsonl: record 2 is not a judgment"),
                          ([str(tmp_path / "none.jsonl")], "file not found"),
                          ([str(tmp_path / "good.jsonl"), "--table1", "cme"], "key=value")]:
        r = subprocess.run([sys.executable, "evaluate.py", "report", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- statistics on the real AlpacaEval verdicts ----------------------------------------------------------

def real_verdicts(name: str) -> list[dict]:
    path = VERDICTS_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not present (test data only in the development checkout)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", ["gpt-3.5-turbo-0301_vs_gpt4_1106_preview.weighted_alpaca_eval_gpt4_turbo.jsonl.gz",
                                  "phi-2_vs_gpt4_1106_preview.weighted_alpaca_eval_gpt4_turbo.jsonl.gz",
                                  "NullModel_vs_gpt4_1106_preview.weighted_alpaca_eval_gpt4_turbo.jsonl.gz"])
def test_real_verdicts_win_rate_and_interval(name, tmp_path):
    rows = real_verdicts(name)
    out = tmp_path / "ae.jsonl"
    r = subprocess.run([sys.executable, "evaluate.py", "convert", str(VERDICTS_DIR / name), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "evaluate.py", "report", str(out), "--format", "json"], cwd=ROOT,
                       capture_output=True, text=True)
    (row,) = json.loads(r.stdout)["win_rates"]
    # Independently: a prompt is a win when the judge's probability for the candidate is above 1/2.
    p = np.array([x["ae_p_candidate_preferred"] for x in rows])
    wins, ties = (p > 0.5).sum(), (p == 0.5).sum()
    assert row["n"] == len(rows) and row["win_rate"] == pytest.approx(100 * (wins + ties / 2) / len(rows))
    scores = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    se = 100 * scores.std(ddof=1) / math.sqrt(len(scores))
    assert row["ci_low"] == pytest.approx(row["win_rate"] - 1.96 * se, abs=0.35)
    assert row["ci_high"] == pytest.approx(row["win_rate"] + 1.96 * se, abs=0.35)
    mean_chars = np.mean([len(x["output_candidate"]) for x in rows])
    assert row["chars_candidate"] == pytest.approx(mean_chars) and row["first_wins"] is None  # order unknown


def test_real_verdicts_agreement_between_three_judges(tmp_path):
    names = [f"gpt-3.5-turbo-0301_vs_gpt4_1106_preview.{a}.jsonl.gz" for a in
             ("alpaca_eval_cot_gpt4_turbo_fn", "alpaca_eval_gpt4_turbo_fn", "weighted_alpaca_eval_gpt4_turbo")]
    tables = [real_verdicts(n) for n in names]
    records = [E.from_alpaca_eval(row) for t in tables for row in t]
    report = W.compute_report(records, resamples=1000)
    mean_row = [w for w in report["win_rates"] if w["judge"] == "mean of 3 judges"][0]
    verdict = [{r["index"]: np.sign(r["ae_p_candidate_preferred"] - 0.5) for r in t} for t in tables]
    per_prompt = [np.mean([(v[i] + 1) / 2 for v in verdict]) for i in sorted(verdict[0])]
    assert mean_row["win_rate"] == pytest.approx(100 * np.mean(per_prompt))
    for agree in report["agreement"]:
        a, b = (verdict[[t[0]["ae_annotator"] for t in tables].index(agree[k])] for k in ("judge_1", "judge_2"))
        idx = sorted(a)
        confusion = np.zeros((3, 3))
        for i in idx:
            confusion[int(a[i]) + 1, int(b[i]) + 1] += 1
        confusion /= len(idx)
        p_o, p_e = np.trace(confusion), confusion.sum(1) @ confusion.sum(0)
        assert agree["agreement"] == pytest.approx(100 * p_o)
        assert agree["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))


# --- tiny local models: generate, the local judge, cme -------------------------------------------------

PROMPTS = ["Say hello.", "What is 中文?", "Count to three.", "Name a colour.", "Write a haiku about {braces}."]


@pytest.fixture(scope="module")
def prompts_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"index": 10 + i, "instruction": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def test_generate_is_greedy_and_resumes(built, prompts_path, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sampling import chat_prefix

    out = tmp_path / "q.jsonl"
    args = ["generate", "--model", str(built["qwen2"]), "--out", str(out), "--prompts", str(prompts_path),
            "--max-new-tokens", "12", "--batch-size", "2", "--name", "tiny-qwen", "--device", "cpu"]
    assert E.main(args + ["--limit", "3"]) == 0
    first = out.read_text()
    assert len(first.splitlines()) == 3
    assert E.main(args) == 0
    text = out.read_text()
    assert text.startswith(first)  # the first three are kept, not regenerated
    records = R.read_jsonl(out)
    assert sorted(r["index"] for r in records) == [10, 11, 12, 13, 14]
    assert E.main(args) == 0 and out.read_text() == text  # nothing left to do

    model = AutoModelForCausalLM.from_pretrained(built["qwen2"]).eval()
    tok = AutoTokenizer.from_pretrained(built["qwen2"])
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    for r in records:  # the oracle: one prompt at a time, plain greedy
        ids = tok(chat_prefix(tok, r["instruction"]), return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            g = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                               pad_token_id=eos[0])[0, ids.shape[1]:].tolist()
        n = next((k for k, t in enumerate(g) if t in eos), len(g))
        assert r["tokens"] == n and r["truncated"] == (n == len(g) == 12)
        assert r["output"] == tok.decode(g[:n], skip_special_tokens=True)
        assert r["generator"] == "tiny-qwen" and r["instruction"] == PROMPTS[r["index"] - 10]


def test_prompts_from_the_hub_file_through_huggingface_hub(tmp_path):
    """The default source, `hf_hub_download` of tatsu-lab/alpaca_eval's alpaca_eval.json, served from a
    hub cache laid out as huggingface_hub lays it out (offline here: no network in the tests)."""
    snapshot = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    rows = [{"instruction": p, "output": "ref", "generator": "gpt4", "dataset": "x"} for p in PROMPTS]
    (snapshot / "alpaca_eval.json").write_text(json.dumps(rows))
    code = "import json, prompts as P; print(json.dumps(P.load_eval_prompts()))"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"index": i, "instruction": p} for i, p in enumerate(PROMPTS)]
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    r = subprocess.run([sys.executable, "evaluate.py", "generate", "--model", "x", "--out", str(tmp_path / "o.jsonl")],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "cannot fetch alpaca_eval.json" in r.stderr and "--prompts" in r.stderr


def test_generate_refuses_to_mix_generators(built, prompts_path, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"index": 10, "instruction": "Say hello.", "output": "hi", "generator": "other"}) + "\n")
    r = subprocess.run([sys.executable, "evaluate.py", "generate", "--model", str(built["qwen2"]), "--out", str(out),
                        "--prompts", str(prompts_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "holds outputs of 'other'" in r.stderr


def test_unknown_model_and_missing_prompts_are_one_line(built, tmp_path):
    for args, message in [(["--model", str(tmp_path / "nope"), "--prompts", str(tmp_path / "p.jsonl")], "file not found"),
                          (["--model", str(tmp_path / "nope"), "--prompts", "prompts.txt"], "--prompts must be")]:
        r = subprocess.run([sys.executable, "evaluate.py", "generate", "--out", str(tmp_path / "o.jsonl"), *args],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(scope="module")
def tiny_outputs(built, prompts_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    for name, model in (("qwen", "qwen2"), ("llama", "llama")):
        assert E.main(["generate", "--model", str(built[model]), "--out", str(d / f"{name}.jsonl"), "--prompts",
                       str(prompts_path), "--max-new-tokens", "10", "--name", f"tiny-{name}", "--device", "cpu"]) == 0
    return d / "qwen.jsonl", d / "llama.jsonl"


def test_local_hf_judge_end_to_end(built, tiny_outputs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from reward import prompt_prefix

    out = tmp_path / "j.jsonl"
    judge = f"hf:{built['qwen2']}?max_new_tokens=6&name=tiny-judge"
    args = ["judge", str(tiny_outputs[0]), str(tiny_outputs[1]), "--judge", judge, "--replicates", "2",
            "--out", str(out), "--device", "cpu"]
    assert E.main(args) == 0
    records = R.read_jsonl(out)
    assert len(records) == 10 and {r["judge"] for r in records} == {"tiny-judge"}
    assert E.main(args) == 0 and len(R.read_jsonl(out)) == 10  # a rerun asks nothing

    # The oracle: each label's log-probability as a whole continuation, by a plain forward pass.
    model = AutoModelForCausalLM.from_pretrained(built["qwen2"]).eval()
    tok = AutoTokenizer.from_pretrained(built["qwen2"])
    cand, opp = R.read_outputs(tiny_outputs[0]), R.read_outputs(tiny_outputs[1])
    multi_token_tie = len(tok(" tie", add_special_tokens=False).input_ids) > 1
    for r in records[:4]:
        c, o = cand[r["index"]]["output"], opp[r["index"]]["output"]
        a, b = (o, c) if r["swapped"] else (c, o)
        context = prompt_prefix(tok, J.judge_prompt(J.JUDGE_TEMPLATE, r["instruction"], a, b))
        context += (r["justification"] + "\n" if r["justification"] else "") + "Verdict:"
        ctx = tok(context, add_special_tokens=False).input_ids
        logps = []
        for label in J.LABELS:
            ids = tok(context + " " + label, add_special_tokens=False).input_ids
            assert ids[:len(ctx)] == ctx
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            logps.append(sum(float(logits[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        p = np.exp(np.array(logps) - max(logps))
        p /= p.sum()
        assert [r["probs"][lab] for lab in J.LABELS] == pytest.approx(p.tolist(), abs=1e-5)
        assert r["verdict"] == E.candidate_verdict(J.LABELS[int(np.argmax(p))], r["swapped"])
    assert multi_token_tie  # so the whole-continuation scoring is really exercised

    r = subprocess.run([sys.executable, "evaluate.py", "report", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "tiny-qwen" in r.stdout and "tiny-judge" in r.stdout


def test_cme_mean_and_heatmaps(built, tiny_outputs, tmp_path):
    from reward import Verifier, load_causal_lm

    rows = C.run_cme(list(tiny_outputs), str(built["gemma3"]), heatmap=[11], heatmap_dir=tmp_path, device="cpu")
    model, tok = load_causal_lm(str(built["gemma3"]), device="cpu")
    verifier = Verifier(model, tok)
    for row, path in zip(rows, tiny_outputs):
        recs = R.read_outputs(path)
        cme = verifier.sequence_cme([r["instruction"] for r in recs.values()], [r["output"] for r in recs.values()])
        assert row["cme_mean"] == pytest.approx(np.nanmean(cme)) and row["n"] == np.isfinite(cme).sum()
        pieces, surprise = C.token_surprise(verifier, recs[11]["instruction"], recs[11]["output"])
        assert "".join(pieces) == recs[11]["output"] and len(pieces) == len(surprise)
        html = (tmp_path / f"{row['generator']}-11.html").read_text()
        assert f"mean CE = {surprise.mean():.2f} nats/token" in html
        assert surprise.mean() == pytest.approx(verifier.sequence_cme([recs[11]["instruction"]], [recs[11]["output"]])[0])
    C.run_cme([tiny_outputs[0]], str(built["gemma3"]), heatmap=[12], heatmap_dir=tmp_path, heatmap_format="png",
              device="cpu", limit=2)
    png = tmp_path / "tiny-qwen-12.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_system_prompt_is_recorded_and_never_mixed(built, tmp_path):
    import evaluate as E

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Say {w}.", "index": i}) + "\n"
                               for i, w in enumerate(["yes", "no", "maybe"])))
    out = tmp_path / "o.jsonl"
    base = ["generate", "--model", str(built["qwen2"]), "--name", "q", "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "4", "--device", "cpu"]
    assert E.main(base + ["--limit", "2", "--system-prompt", ""]) == 0
    assert [r["system_prompt"] for r in R.read_jsonl(out)] == ["", ""]
    assert E.main(base + ["--system-prompt", "Be brief."]) == 2  # another system prompt: refused, file intact
    assert len(R.read_jsonl(out)) == 2
    assert E.main(base + ["--system-prompt", ""]) == 0 and len(R.read_jsonl(out)) == 3
