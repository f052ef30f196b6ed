"""The judge of Section 3: pairwise LLM-as-judge comparisons, from the prompt to a verdict.

    from judge import JudgeSpec, make_judge, JUDGE_TEMPLATE
    judge = make_judge(JudgeSpec.parse("api:gpt-5.2"))        # or "hf:Qwen/Qwen2.5-7B-Instruct"
    for k, answer in judge.run([prompt_1, prompt_2]): ...     # answer.label: "A", "B", "tie" or None

What is here: the judge prompt (`JUDGE_TEMPLATE`, `judge_prompt`), reading a verdict out of an
answer (`parse_verdict`), the judge spec strings (`JudgeSpec`, `redact_spec`), and the two backends:
`APIJudge` (any OpenAI-compatible chat-completions endpoint through `ChatClient`, standard library
only, with retries and a concurrency limit) and `LocalJudge` (a Hugging Face model). What a
comparison is (which outputs, A/B order, replicates, the records' keys) is evaluate.py's.

Readings of the paper:
  1. The judge prompt is ours (the paper does not publish its own): instruction and the two
     responses as A and B, never model names; one sentence of justification, then a line
     `Verdict: A`, `Verdict: B` or `Verdict: tie`. The last well-formed verdict line counts.
  2. A local Hugging Face judge reads its verdict from the probabilities of the three label
     continuations " A", " B", " tie" after its generated justification and "Verdict:", each scored as
     a whole continuation (all its tokens, through reward.py's batched scorer), not as one token id.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import queue
import random
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from records import one_line

LABELS = ("A", "B", "tie")

JUDGE_TEMPLATE = """\
You are comparing two AI assistants' responses to the same user instruction.

[Instruction]
{instruction}

[Response A]
{response_a}

[Response B]
{response_b}

Which response follows the instruction better: more helpful, accurate, relevant and clear? Judge \
the content only: the order of the responses and their length must not sway you. Write one \
sentence of justification, then give your verdict on its own last line, exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""


# --- the judge's prompt and answer ---------------------------------------------------------------------

_VERDICT_LINE = re.compile(r"^[\W_]*(?:final\s+)?verdict[\W_]*?[:：](.*)$", re.I | re.M)
_LABEL = re.compile(r"^[\W_]*(?:(?:response|answer|assistant|output)\s*)?(a\s+tie|tie|a|b)\b", re.I)


def parse_verdict(answer: str) -> tuple[str | None, str]:
    """The verdict of a judge's answer and its justification.

    Returns (label, justification): label "A", "B" or "tie" from the last well-formed verdict line (a
    line "Verdict: X", markdown and brackets allowed, "Response B" allowed, any case), or None; the
    justification is the text before that line (the whole answer when there is none), stripped.
    A label merely quoted inside a sentence ('I would not say "Verdict: A"') is not a verdict line.
    """
    last = None
    for m in _VERDICT_LINE.finditer(answer):
        label = _LABEL.match(m.group(1))
        if label:
            last = (m, label.group(1).lower())
    if last is None:
        return None, answer.strip()
    m, label = last
    label = "tie" if label.endswith("tie") else label.upper()
    return label, answer[:m.start()].strip()


def judge_prompt(template: str, instruction: str, response_a: str, response_b: str) -> str:
    """The judge's user message. str.format would choke on braces inside responses; replace names only."""
    return (template.replace("{instruction}", instruction).replace("{response_a}", response_a)
            .replace("{response_b}", response_b))


# --- judge backends ------------------------------------------------------------------------------------

class JudgeError(Exception):
    """A failure that ends the run: a request refused (4xx) or a service still failing after all retries."""


@dataclass
class Answer:
    """A judge's answer to one prompt: label A/B/tie (None: no verdict), justification, raw text, probs."""
    label: str | None
    justification: str
    raw: str
    probs: dict | None = None


class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (OpenAI, Anthropic's compatible endpoint, vLLM,
    llama.cpp), standard library only.

    base_url: e.g. "https://api.openai.com/v1"; the request goes to base_url + "/chat/completions".
    model: the model id. key_env: the NAME of the environment variable that holds the API key (None:
    no Authorization header); the key itself is never printed, logged or written. params: extra body
    fields, sent exactly as given (nothing else is added: newer models reject temperature, logprobs or
    max_tokens). 429, 5xx, timeouts, dropped connections and malformed bodies are retried `retries`
    times with exponential backoff (`backoff` * 2^attempt seconds, at most `max_backoff`, times a
    random factor in [0.5, 1], or the server's Retry-After), then raise JudgeError; other 4xx raise at once.
    """

    def __init__(self, base_url: str, model: str, key_env: str | None = None, params: dict | None = None,
                 timeout: float = 120.0, retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.params = dict(params or {})
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._key = None
        if key_env:
            self._key = os.environ.get(key_env)
            if not self._key:
                raise ValueError(f"environment variable {key_env} (the judge's API key) is not set")
        self._rng = random.Random()

    def __repr__(self) -> str:  # no key in here, ever
        return f"ChatClient({self.url!r}, {self.model!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply text to `messages` ([{"role", "content"}]); "" when the reply has no content."""
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.retries + 1):
            wait = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    raw = reply.read()
                try:
                    content = json.loads(raw)["choices"][0]["message"].get("content")
                    return content if isinstance(content, str) else ""
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    reason = f"malformed reply body {raw[:80]!r}"
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read()[:300].decode("utf-8", "replace"))
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"{self.url} refused the request: HTTP {e.code} {one_line(detail)}")
                reason = f"HTTP {e.code}"
                wait = _retry_after(e.headers.get("Retry-After"))
            except (TimeoutError, socket.timeout):
                reason = f"no reply within {self.timeout:g} s"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
                reason = f"connection failed ({self._redact(one_line(e))})"
            if attempt == self.retries:
                raise JudgeError(f"{self.url}: {reason}, still after {self.retries + 1} attempts")
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2 ** attempt) * self._rng.uniform(0.5, 1.0)
            time.sleep(min(wait, self.max_backoff))


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass
class JudgeSpec:
    """A judge from its spec string `KIND:MODEL?option=value&...`.

    api:MODEL options: base (default https://api.openai.com/v1), key (env var NAME; default
      OPENAI_API_KEY for the default base, none otherwise), timeout (s, 120), concurrency (8),
      retries (6), backoff (s, 1), name (default MODEL); every other option is a request body field,
      sent as given (values read as JSON where they parse: temperature=0 is a number).
    hf:MODEL (hub id or local folder) options: max_new_tokens (justification length, 64),
      batch_size (4), name (default MODEL).
    `params` are what changes the judgments (they enter the record key); the rest are how to run.
    """
    kind: str
    model: str
    name: str
    params: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    API_OPTIONS = ("base", "key", "timeout", "concurrency", "retries", "backoff", "name")
    HF_OPTIONS = ("batch_size", "name")
    HF_PARAMS = ("max_new_tokens",)

    @classmethod
    def parse(cls, spec: str) -> "JudgeSpec":
        kind, sep, rest = spec.partition(":")
        if not sep or kind not in ("api", "hf") or not rest:
            raise ValueError(f"judge spec {redact_spec(spec)!r}: expected 'api:MODEL[?options]' or 'hf:MODEL[?options]'")
        model, _, query = rest.partition("?")
        params, options = {}, {}
        try:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise ValueError(f"judge spec {redact_spec(spec)!r}: options must read key=value&key=value") from None
        for k, v in pairs:
            value = v
            if k not in ("base", "key", "name"):  # those stay strings; others are JSON where they parse
                try:
                    value = json.loads(v)
                except ValueError:
                    pass
            if kind == "api":
                (options if k in cls.API_OPTIONS else params)[k] = value
            elif k in cls.HF_OPTIONS:
                options[k] = value
            elif k in cls.HF_PARAMS:
                params[k] = value
            else:
                raise ValueError(f"judge spec {redact_spec(spec)!r}: unknown option {k!r} for a local judge "
                                 f"(known: {', '.join(cls.HF_OPTIONS + cls.HF_PARAMS)})")
        if kind == "hf":
            params.setdefault("max_new_tokens", 64)
        key = options.get("key")
        if key is not None and not _ENV_NAME.fullmatch(key):  # never echo it: it may be the secret itself
            raise ValueError(f"judge spec {redact_spec(spec)!r}: key takes the NAME of the environment variable "
                             "that holds the API key (key=OPENAI_API_KEY), not the key itself")
        # (option, smallest value, integer?, strictly above the smallest?)
        for name, low, integer, strict in (("timeout", 0, False, True), ("backoff", 0, False, False),
                                           ("concurrency", 1, True, False), ("retries", 0, True, False),
                                           ("batch_size", 1, True, False), ("max_new_tokens", 1, True, False)):
            value = {**options, **params}.get(name)
            if value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (number and (value == int(value) or not integer) and (value > low if strict else value >= low)):
                need = f"{'an integer' if integer else 'a number'} {'above' if strict else 'of at least'} {low}"
                raise ValueError(f"judge spec {redact_spec(spec)!r}: option {name} must be {need}, not {value!r}")
        return cls(kind, model, str(options.get("name") or model), params, options)

    @property
    def identity(self) -> str:
        return json.dumps([self.name, self.params], sort_keys=True)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET = re.compile(r"(?i)\b(?:sk|pk|rk|key|api|token|bearer)[-_][A-Za-z0-9_\-]{8,}|[A-Za-z0-9_\-]{32,}")


def redact_spec(spec: str) -> str:
    """A judge spec fit to print: the value of `key` unless it is an environment variable's name, and
    anything else that looks like a secret (sk-..., long random strings), replaced by ***."""
    model, sep, query = spec.partition("?")
    parts = []
    for part in query.split("&") if sep else []:
        k, eq, v = part.partition("=")
        parts.append(f"{k}=***" if eq and k == "key" and not _ENV_NAME.fullmatch(v) else part)
    return _SECRET.sub("***", model + sep + "&".join(parts))


class APIJudge:
    """A judge behind an OpenAI-compatible endpoint, asked concurrently by a bounded pool of threads."""

    def __init__(self, spec: JudgeSpec, tries: int = 3):
        o = spec.options
        base = o.get("base", "https://api.openai.com/v1")
        key_env = o.get("key", "OPENAI_API_KEY" if "base" not in o else None)
        self.tries = tries
        self.concurrency = int(o.get("concurrency", 8))
        self.client = ChatClient(base, spec.model, key_env, spec.params, timeout=float(o.get("timeout", 120)),
                                 retries=int(o.get("retries", 6)), backoff=float(o.get("backoff", 1.0)))

    def ask(self, prompt: str) -> Answer:
        """Ask once; ask again (up to `tries` in all) while the answer has no well-formed verdict."""
        raw = ""
        for _ in range(self.tries):
            raw = self.client.complete([{"role": "user", "content": prompt}])
            label, justification = parse_verdict(raw)
            if label is not None:
                return Answer(label, justification, raw)
        return Answer(None, parse_verdict(raw)[1], raw)

    def run(self, prompts: Sequence[str]) -> Iterator[tuple[int, Answer]]:
        """(position, answer) for each prompt, in order of completion, `concurrency` requests at a time.

        The workers are daemon threads (not a ThreadPoolExecutor, whose exit hook would wait out every
        request in flight, retries included): on an error or Ctrl-C the run ends at once, losing only
        the answers in flight, which a rerun asks again. Ctrl-C only sets a flag that this loop checks
        (raising KeyboardInterrupt here, between two answers): Python's own KeyboardInterrupt is raised
        wherever the main thread happens to be, and one raised inside a finalizer (`__del__`, run by the
        garbage collector at any allocation) is printed as "Exception ignored" and lost.
        """
        todo, done, stop, interrupted = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event(), threading.Event()
        for item in enumerate(prompts):
            todo.put(item)

        def worker():
            while not stop.is_set():
                try:
                    i, prompt = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, self.ask(prompt), None))
                except Exception as e:  # noqa: BLE001  (handed to the main thread, raised there)
                    done.put((i, None, e))

        for _ in range(min(self.concurrency, len(prompts))):
            threading.Thread(target=worker, daemon=True).start()
        previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
            previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
        try:
            for _ in range(len(prompts)):
                while True:
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    try:
                        i, answer, error = done.get(timeout=0.2)  # a timeout keeps Ctrl-C responsive
                        break
                    except queue.Empty:
                        continue
                if error is not None:
                    raise error
                yield i, answer
        finally:
            stop.set()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


class LocalJudge:
    """A local causal LM as judge: it writes its justification greedily, then its verdict is the most
    probable of the continuations " A", " B", " tie" after "Verdict:", each scored in full."""

    def __init__(self, spec: JudgeSpec, device: str | None = None):
        from reward import Verifier
        from sampling import load_generator

        self.max_new_tokens = int(spec.params["max_new_tokens"])
        self.batch_size = int(spec.options.get("batch_size", 4))
        self.model, self.tokenizer, _, self.eos_ids = load_generator(spec.model, device, dtype=None)
        self.scorer = Verifier(self.model, self.tokenizer)

    def label_logprobs(self, prompts: Sequence[str], justifications: Sequence[str]) -> np.ndarray:
        """log p(" A" | ...), log p(" B" | ...), log p(" tie" | ...) after each justification: (B, 3) float64.

        The assistant's text is `justification + "\\nVerdict:" + " " + label`, encoded as the verifier
        encodes responses (reward.encode_pairs); a label's log-probability is the sum over every token
        that holds a byte of " label" (a token straddling the boundary counts in full).
        """
        from reward import encode_pairs

        texts, starts = [], []
        for j in justifications:
            head = (j + "\n" if j else "") + "Verdict:"
            for label in LABELS:
                texts.append(f"{head} {label}")
                starts.append(len(head.encode("utf-8")))
        inputs = encode_pairs(self.tokenizer, [p for p in prompts for _ in LABELS], texts)
        positions = [v.response[v.spans[:, 1] > s] for v, s in zip(inputs, starts)]
        logps = self.scorer.logprobs([v.ids for v in inputs], positions)
        return np.array([lp.sum() for lp in logps]).reshape(len(prompts), len(LABELS))

    def run(self, prompts: Sequence[str]) -> Iterator[tuple[int, Answer]]:
        from sampling import greedy_generate  # the evaluated models' own greedy decoding

        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start:start + self.batch_size])
            generated = [None] * len(batch)
            for results in greedy_generate(self.model, self.tokenizer, batch, self.max_new_tokens, self.eos_ids,
                                           self.batch_size):
                for r in results:
                    generated[r["position"]] = r["output"]
            justifications = [_justification(g) for g in generated]
            logp = self.label_logprobs(batch, justifications)
            for k, (j, row) in enumerate(zip(justifications, logp)):
                p = np.exp(row - row.max())
                p /= p.sum()
                label = LABELS[int(np.argmax(row))]
                raw = (j + "\n" if j else "") + f"Verdict: {label}"
                yield start + k, Answer(label, j, raw, {lab: round(float(x), 6) for lab, x in zip(LABELS, p)})


def _justification(generated: str) -> str:
    """The justification a local judge wrote: its text before any "Verdict", else its first line."""
    cut = re.search(r"verdict", generated, re.I)
    text = generated[:cut.start()] if cut else generated.strip().split("\n")[0]
    return " ".join(text.split())


def make_judge(spec: JudgeSpec, tries: int = 3, device: str | None = None):
    return APIJudge(spec, tries) if spec.kind == "api" else LocalJudge(spec, device)
