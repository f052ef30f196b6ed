"""Evaluation of CME-GRPO on AlpacaEval 2.0 prompts: generation, pairwise LLM-as-judge, win rates
(Section 3, Appendix E) and the CME diagnostic of Figure 1.

    python evaluate.py generate --model runs/cme-grpo/checkpoint-40 --out outputs/cme.jsonl
    python evaluate.py judge outputs/cme.jsonl outputs/base.jsonl --judge api:gpt-5.2 \\
        --judge "api:claude-sonnet-4-6?base=https://api.anthropic.com/v1&key=ANTHROPIC_API_KEY" \\
        --replicates 5 --out judgments/cme_vs_base.jsonl
    python evaluate.py report judgments/*.jsonl
    python evaluate.py cme outputs/*.jsonl --verifier google/gemma-3-1b-it --heatmap 0
    python evaluate.py convert ALPACA_EVAL_ANNOTATIONS.jsonl.gz --out judgments/ae.jsonl

The paper's protocol (Appendix E): greedy responses of each model to the 805 AlpacaEval prompts;
five pairwise judgments per prompt with randomised A/B order by each of two judges; the tie-adjusted
win rate (wins + ties/2) / N over N = 805 prompts; each Table 1 cell the mean of the two judges.
Readings of, and additions to, the paper:
  1. Greedy means greedy: do_sample off and none of the checkpoint's generation_config processors
     (Qwen2.5-Instruct ships a repetition penalty of 1.05); prompts go through the model's chat template
     (`bos_token + "User: {prompt}\\nAssistant: "` without one, as in training).
  2. The judge itself (its prompt, reading its verdict, the API and local backends) is judge.py's.
  3. A/B order is a function of (seed, replicate, instruction) through SHA-256, so a rerun, another
     machine or another Python gives the same order (Python's hash() is salted per process).
  4. Replicates: a prompt's score is the mean over its replicates of win 1, tie 1/2, loss 0; the win
     rate is the mean over prompts, so N counts prompts. A judgment whose answer has no verdict after
     `--verdict-tries` attempts is recorded as an error and left out of N; a prompt with only errors
     is left out.
  5. Statistics the paper does not report: 95% bootstrap intervals over prompts (replicates of a
     prompt resampled together), agreement between judges (raw and Cohen's kappa on per-prompt
     majority verdicts), position bias and length.

Shape letters: N prompts, R replicates, J judges.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from judge import JUDGE_TEMPLATE, Answer, JudgeError, JudgeSpec, _one_line, judge_prompt, make_judge

ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval.json"
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
VERDICTS = ("win", "tie", "loss", "error")
# --- files ---------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, partial_tail_ok: bool = False) -> list[dict]:
    """JSON objects of a .jsonl (or .jsonl.gz) file, one per non-blank line.

    partial_tail_ok: skip a last line cut off mid-write (no trailing newline, not valid JSON), as an
    interrupted run leaves it. Raises ValueError naming the file and line of anything malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (UnicodeDecodeError, OSError, EOFError) as e:  # a binary file, a broken .gz
        raise ValueError(f"{path}: cannot read it as UTF-8 JSON lines ({_one_line(e)[:80]})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if partial_tail_ok and n == len(lines):
                print(f"note: skipped the unfinished last line {n} of {path} (an interrupted write)",
                      file=sys.stderr)
                continue
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        out.append(obj)
    return out


def open_for_append(path: Path):
    """Open a JSONL file to append records, first cutting off a line an interrupted write left unfinished."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name a .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(keep)
            print(f"note: dropped an unfinished last line of {path} (an interrupted write)", file=sys.stderr)
    return open(path, "a", encoding="utf-8")


def write_record(f, record: dict) -> None:
    """Append one record as a JSON line and flush it, so that a killed run loses nothing written."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def read_json_list(path: Path) -> list:
    """The list held by a .json file (AlpacaEval's format), with the file and line of a syntax error."""
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?)") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return rows


def read_template(path: Path) -> str:
    """A judge prompt template file, or one line naming it."""
    if not path.is_file():
        raise ValueError(f"template file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?)") from None


# --- prompts and outputs -------------------------------------------------------------------------------

def load_eval_prompts(source: str = "alpaca_eval") -> list[dict]:
    """The evaluation prompts as [{index, instruction}], in file order.

    source: "alpaca_eval" (the file alpaca_eval.json of the hub dataset repo tatsu-lab/alpaca_eval,
    fetched with huggingface_hub: its loading script no longer runs under datasets >= 4), or a local
    .jsonl / .json file of objects with an "instruction" field (an "index" field is kept if present,
    else the position is the index).
    """
    if source == "alpaca_eval":
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(ALPACA_EVAL_REPO, ALPACA_EVAL_FILE, repo_type="dataset")
        except Exception as e:  # noqa: BLE001  (offline, auth and HTTP errors come in many types)
            raise ValueError(f"cannot fetch {ALPACA_EVAL_FILE} of {ALPACA_EVAL_REPO} from the Hugging Face "
                             f"hub ({_one_line(e)}); pass a local file with --prompts") from None
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    else:
        path = Path(source)
        if path.suffix == ".json":
            rows = read_json_list(path)
        elif path.suffix in (".jsonl", ".gz"):
            rows = read_jsonl(path)
        else:
            raise ValueError(f"--prompts must be 'alpaca_eval' or a .jsonl / .json file, not {source!r}")
    out, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise ValueError(f"{source}: item {i} has no string 'instruction' field")
        index = row.get("index", i)
        if not isinstance(index, int) or index in seen:
            raise ValueError(f"{source}: item {i} has a missing or repeated integer 'index' ({index!r})")
        seen.add(index)
        out.append({"index": index, "instruction": row["instruction"]})
    return out


def read_outputs(path: str | Path) -> dict[int, dict]:
    """A model's outputs file (what `generate` writes; AlpacaEval's .json lists work too) as index -> record.

    Every record has index (the position for a .json list), instruction, output and generator (the
    file's name when absent).
    """
    path = Path(path)
    if path.suffix == ".json":
        rows = [dict(r, index=r.get("index", i)) if isinstance(r, dict) else {}
                for i, r in enumerate(read_json_list(path))]
    else:
        rows = read_jsonl(path, partial_tail_ok=True)
    name = path.name.split(".")[0]
    out = {}
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("index"), int) or not isinstance(r.get("instruction"), str) \
                or not isinstance(r.get("output"), str):
            raise ValueError(f"{path}: record {n} needs an integer 'index' and string 'instruction' and 'output'")
        out[r["index"]] = {"index": r["index"], "instruction": r["instruction"], "output": r["output"],
                           "generator": str(r.get("generator") or name)}
    if not out:
        raise ValueError(f"{path}: no outputs")
    return out


# --- generate ------------------------------------------------------------------------------------------

def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, eos_ids: list[int],
                    batch_size: int = 8, progress: bool = False, system_prompt: str | None = None
                    ) -> Iterator[list[dict]]:
    """Greedy responses to user prompts, a batch at a time (yields per batch, for writing as it goes).

    prompts: strings, each rendered with the model's chat template (reward.PLAIN_TEMPLATE without one).
    eos_ids: the stop ids (train.stop_token_ids: EOS and the template's turn end).
    system_prompt: as train.chat_prefix (None: the template's own default).
    Prompts are processed longest first (little left padding per batch). Yields, per batch, dicts
    {position (in prompts), output (text before EOS), tokens (generated ids before EOS), truncated
    (no EOS within max_new_tokens)}.
    """
    import torch
    from transformers import GenerationConfig
    from align import decode_response, token_bytes
    from train import _autocast, chat_prefix, left_pad

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                              pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0)
    ids = [tokenizer(chat_prefix(tokenizer, p, system_prompt), add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt")
    model.eval()
    eos = torch.tensor(eos_ids)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        x, attn = left_pad([ids[i] for i in batch], pad, device)
        P = x.shape[1]
        with torch.no_grad(), _autocast(device):  # bf16 autocast on CUDA
            out = model.generate(input_ids=x, attention_mask=attn, generation_config=config)
        results = []
        for row, i in enumerate(batch):
            r = out[row, P:].cpu()
            hits = torch.isin(r, eos).nonzero()
            n = int(hits[0]) if len(hits) else r.shape[0]
            text = decode_response(token_bytes(tokenizer, r[:n].numpy())).text
            results.append({"position": i, "output": text, "tokens": n, "truncated": not len(hits)})
        if bar:
            bar.update(len(batch))
        yield results
    if bar:
        bar.close()


def run_generate(model_name: str, out: Path, prompts_source: str = "alpaca_eval", max_new_tokens: int = 2048,
                 batch_size: int = 8, name: str | None = None, limit: int | None = None,
                 device: str | None = None, trust_remote_code: bool = False, system_prompt: str | None = None) -> int:
    """Write greedy outputs of a model to `out` as JSONL, skipping indices already there. Returns the count written.

    Each line: {index, instruction, output, generator, tokens (generated tokens before EOS),
    truncated (no EOS within max_new_tokens), max_new_tokens, system_prompt (null: the template's own)}.
    """
    from train import load_generator

    name = name or model_name
    prompts = load_eval_prompts(prompts_source)[:limit]
    done = set()
    if out.exists():
        for r in read_jsonl(out, partial_tail_ok=True):
            if r.get("generator") != name:
                raise ValueError(f"{out} holds outputs of {r.get('generator')!r}, not {name!r}; "
                                 f"choose another --out or --name")
            if r.get("system_prompt") != system_prompt:
                raise ValueError(f"{out} holds outputs made with --system-prompt {r.get('system_prompt')!r}, not "
                                 f"{system_prompt!r}; choose another --out")
            done.add(r["index"])
    todo = [p for p in prompts if p["index"] not in done]
    print(f"{len(prompts) - len(todo)} of {len(prompts)} prompts already in {out}; generating {len(todo)}",
          file=sys.stderr)
    if not todo:
        return 0
    model, tok, _, eos_ids = load_generator(model_name, device, trust_remote_code=trust_remote_code, dtype=None)
    check_context(model, tok, [p["instruction"] for p in todo], [p["index"] for p in todo], max_new_tokens,
                  system_prompt)
    written = 0
    with open_for_append(out) as f:
        for batch in greedy_generate(model, tok, [p["instruction"] for p in todo], max_new_tokens, eos_ids,
                                     batch_size, progress=True, system_prompt=system_prompt):
            for r in batch:
                p = todo[r["position"]]
                write_record(f, {"index": p["index"], "instruction": p["instruction"], "output": r["output"],
                                 "generator": name, "tokens": r["tokens"], "truncated": r["truncated"],
                                 "max_new_tokens": max_new_tokens, "system_prompt": system_prompt})
                written += 1
    return written


def check_context(model, tokenizer, prompts: Sequence[str], indices: Sequence[int], max_new_tokens: int,
                  system_prompt: str | None = None) -> None:
    """Refuse, before any work, prompts that with --max-new-tokens do not fit the model's context (an
    evaluation must not silently drop prompts: N would change)."""
    from train import rendered_lengths

    context, lengths = rendered_lengths(model, tokenizer, list(prompts), max_new_tokens, system_prompt, who="model")
    long = [i for i, n in zip(indices, lengths) if context is not None and n + max_new_tokens > context]
    if long:
        raise ValueError(f"{len(long)} prompts (index {', '.join(map(str, long[:5]))}{', ...' if len(long) > 5 else ''}) "
                         f"do not fit the model's context of {context} tokens with --max-new-tokens {max_new_tokens}")


def is_swapped(instruction: str, replicate: int, seed: int) -> bool:
    """Whether the candidate is shown as B: a stable coin from SHA-256 of (seed, replicate, instruction)."""
    digest = hashlib.sha256(json.dumps(["order", seed, replicate, instruction]).encode("utf-8")).digest()
    return bool(digest[0] & 1)


def judgment_key(judge_id: str, template: str, index: int, instruction: str, candidate: str, opponent: str,
                 output_candidate: str, output_opponent: str, replicate: int, seed: int | None) -> str:
    """The record's key: a hash of everything that makes two judgments the same.

    Judge (name and request parameters), prompt template, instruction, both outputs, replicate and
    the seed of the A/B order; and the index and both model names, so that two comparisons written to one
    file never share a key where two models gave the same text (empty outputs, say).
    """
    payload = json.dumps([judge_id, template, index, instruction, candidate, opponent, output_candidate,
                          output_opponent, replicate, seed], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def candidate_verdict(label: str | None, swapped: bool) -> str:
    """A/B/tie as shown to the judge -> win/tie/loss/error from the candidate's side."""
    if label is None:
        return "error"
    if label == "tie":
        return "tie"
    return "win" if (label == "A") != swapped else "loss"


# --- judge ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One judgment to make: the candidate's and opponent's outputs for one prompt and replicate."""
    key: str
    index: int
    instruction: str
    replicate: int
    swapped: bool
    output_candidate: str
    output_opponent: str

    def prompt(self, template: str) -> str:
        a, b = (self.output_opponent, self.output_candidate) if self.swapped else (self.output_candidate,
                                                                                   self.output_opponent)
        return judge_prompt(template, self.instruction, a, b)


def pair_outputs(candidate: dict[int, dict], opponent: dict[int, dict]) -> list[int]:
    """Indices present in both outputs files, checking that they hold the same instruction."""
    common = sorted(candidate.keys() & opponent.keys())
    for i in common:
        if candidate[i]["instruction"].strip() != opponent[i]["instruction"].strip():
            raise ValueError(f"index {i}: the two outputs files answer different instructions")
    missing = len(candidate.keys() ^ opponent.keys())
    if missing:
        print(f"note: {missing} indices are in only one of the outputs files; judging the {len(common)} in both",
              file=sys.stderr)
    if not common:
        raise ValueError("the two outputs files share no index")
    return common


def run_judge(candidate_path: Path, opponent_path: Path, judges: Sequence[str], out: Path, replicates: int = 5,
              seed: int = 0, template: str = JUDGE_TEMPLATE, verdict_tries: int = 3, limit: int | None = None,
              device: str | None = None) -> None:
    """Judge the candidate's outputs against the opponent's; append every judgment to `out` as it completes.

    judges: spec strings (JudgeSpec). A judgment whose key is already in `out` is not asked again.
    """
    for field_ in ("{instruction}", "{response_a}", "{response_b}"):
        if field_ not in template:
            raise ValueError(f"the judge template has no {field_} placeholder")
    specs = [JudgeSpec.parse(j) for j in judges]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two judges share a name ({', '.join(names)}); give one a name=... option")
    judges = {s.name: make_judge(s, verdict_tries) for s in specs if s.kind == "api"}  # a missing key fails now
    cand, opp = read_outputs(candidate_path), read_outputs(opponent_path)
    indices = pair_outputs(cand, opp)[:limit]
    cand_name, opp_name = next(iter(cand.values()))["generator"], next(iter(opp.values()))["generator"]
    done = {r.get("key") for r in read_jsonl(out, partial_tail_ok=True)} if out.exists() else set()
    with open_for_append(out) as f:
        for spec in specs:
            jobs, identical = [], 0
            for replicate in range(replicates):
                for i in indices:
                    c, o = cand[i]["output"], opp[i]["output"]
                    instruction = cand[i]["instruction"]
                    key = judgment_key(spec.identity, template, i, instruction, cand_name, opp_name, c, o,
                                       replicate, seed)
                    if key in done:
                        continue
                    job = Job(key, i, instruction, replicate, is_swapped(instruction, replicate, seed), c, o)
                    if c.strip() == o.strip():  # identical outputs: a tie, no call
                        write_record(f, _record(job, cand_name, opp_name, spec.name, seed,
                                                Answer("tie", "identical outputs", None)))
                        identical += 1
                    else:
                        jobs.append(job)
            skipped = replicates * len(indices) - len(jobs) - identical
            print(f"judge {spec.name}: {skipped} judgments already in {out}, {identical} identical pairs (tie, "
                  f"no call), {len(jobs)} to ask", file=sys.stderr)
            if not jobs:
                continue
            judge = judges.get(spec.name) or make_judge(spec, verdict_tries, device)  # local models load here
            from tqdm import tqdm
            errors = 0
            with tqdm(total=len(jobs), desc=f"judge {spec.name}", unit="judgment") as bar:
                for k, answer in judge.run([job.prompt(template) for job in jobs]):
                    record = _record(jobs[k], cand_name, opp_name, spec.name, seed, answer)
                    write_record(f, record)
                    errors += record["verdict"] == "error"
                    bar.update(1)
                    bar.set_postfix(errors=errors)


def _record(job: Job, candidate: str, opponent: str, judge: str, seed: int, answer: Answer) -> dict:
    record = {"key": job.key, "index": job.index, "candidate": candidate, "opponent": opponent, "judge": judge,
              "replicate": job.replicate, "seed": seed, "swapped": job.swapped,
              "verdict": candidate_verdict(answer.label, job.swapped), "justification": answer.justification,
              "raw": answer.raw, "instruction": job.instruction, "len_candidate": len(job.output_candidate),
              "len_opponent": len(job.output_opponent)}
    if answer.probs is not None:
        record["probs"] = answer.probs
    return record


# --- convert: AlpacaEval annotations -> judgments ----------------------------------------------------

def from_alpaca_eval(row: dict) -> dict:
    """One AlpacaEval per-prompt annotation as a judgment record (replicate 0, A/B order unknown).

    row: {index, instruction, candidate, opponent, output_candidate, output_opponent, ae_annotator,
    ae_p_candidate_preferred}; the verdict is win when the judge's probability that the candidate is
    better is above 1/2, loss below, tie at exactly 1/2 (AlpacaEval's value for identical outputs).
    """
    p = row["ae_p_candidate_preferred"]
    verdict = "error" if p is None else "win" if p > 0.5 else "loss" if p < 0.5 else "tie"
    key = judgment_key(row["ae_annotator"], "alpaca_eval", row["index"], row["instruction"], row["candidate"],
                       row["opponent"], row["output_candidate"], row["output_opponent"], 0, None)
    return {"key": key, "index": row["index"], "candidate": row["candidate"], "opponent": row["opponent"],
            "judge": row["ae_annotator"], "replicate": 0, "seed": None, "swapped": None, "verdict": verdict,
            "justification": "", "raw": None if p is None else str(p), "instruction": row["instruction"],
            "len_candidate": len(row["output_candidate"]), "len_opponent": len(row["output_opponent"])}


def run_convert(annotations: Sequence[Path], out: Path) -> int:
    """Convert AlpacaEval annotation files into judgments appended to `out`, as `judge` appends: records
    whose key `out` already holds are skipped, nothing there is overwritten, and `out` may not be one of
    the inputs. Returns the count written."""
    if any(a.resolve() == out.resolve() for a in annotations):
        raise ValueError(f"--out {out} is one of the input files; name another file")
    records = []
    for path in annotations:  # read and check everything before writing anything
        for n, row in enumerate(read_jsonl(path), 1):
            try:
                records.append(from_alpaca_eval(row))
            except KeyError as e:
                raise ValueError(f"{path}: record {n} has no {e.args[0]!r} field (not an AlpacaEval "
                                 "annotation)") from None
    done = {r.get("key") for r in read_jsonl(out, partial_tail_ok=True)} if out.exists() else set()
    new = [r for r in records if r["key"] not in done]
    with open_for_append(out) as f:
        for r in new:
            write_record(f, r)
    print(f"appended {len(new)} judgments to {out} ({len(records) - len(new)} already there)", file=sys.stderr)
    return len(new)


# --- report: statistics --------------------------------------------------------------------------------

def bootstrap_ci(scores: np.ndarray, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt scores: (N,) float -> (low, high).

    Resampling prompts (not judgments) keeps a prompt's replicates together: each prompt enters with
    the mean of its replicates. Fixed seed: the same data give the same interval.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1,000 resamples at a time: (1000, N) indices, a few MB
        k = min(1000, resamples - start)
        means[start:start + k] = scores[rng.integers(0, len(scores), (k, len(scores)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def majority_verdict(verdicts: Sequence[str]) -> str:
    """The most frequent of a prompt's win/tie/loss verdicts; when two are equally frequent, the sign
    of the tie-adjusted score decides (above 1/2 win, below loss, else tie)."""
    counts = Counter(v for v in verdicts if v in SCORE).most_common()
    if not counts:
        raise ValueError("no valid verdict")
    if len(counts) == 1 or counts[0][1] > counts[1][1]:
        return counts[0][0]
    score = np.mean([SCORE[v] for v in verdicts if v in SCORE])
    return "win" if score > 0.5 else "loss" if score < 0.5 else "tie"


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels over the same items: (p_o - p_e) / (1 - p_e); NaN when p_e = 1."""
    n = len(a)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / n ** 2
    return math.nan if p_e == 1 else (p_o - p_e) / (1 - p_e)


def load_judgments(paths: Sequence[str | Path]) -> list[dict]:
    """Judgment records of several files (or folders of *.jsonl), each key once (the first one read)."""
    files = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.jsonl*")) if p.is_dir() else [p])
    records, seen = [], set()
    for path in files:
        for n, r in enumerate(read_jsonl(path, partial_tail_ok=True), 1):
            missing = [k for k in ("key", "index", "candidate", "opponent", "judge", "verdict") if k not in r]
            if missing or r["verdict"] not in VERDICTS:
                raise ValueError(f"{path}: record {n} is not a judgment (missing {missing or 'a valid verdict'})")
            if r["key"] not in seen:
                seen.add(r["key"])
                records.append(r)
    if not records:
        raise ValueError("no judgments in " + ", ".join(map(str, paths)))
    return records


def prompt_scores(records: Sequence[dict]) -> dict[int, float]:
    """index -> mean over the prompt's valid replicates of win 1 / tie 1/2 / loss 0 (errors left out)."""
    per = defaultdict(list)
    for r in records:
        if r["verdict"] in SCORE:
            per[r["index"]].append(SCORE[r["verdict"]])
    return {i: float(np.mean(v)) for i, v in per.items()}


def side_stats(records: Sequence[dict]) -> dict:
    """Position bias and length, over one group's records.

    first_wins: share of decisive judgments (win or loss, judge asked, A/B order known) won by the
    response shown first (A). chars_candidate / chars_opponent: mean characters per prompt.
    longer_wins: share of decisive judgments with outputs of different lengths won by the longer one.
    """
    shown = [r for r in records if r["verdict"] in ("win", "loss") and r.get("swapped") is not None
             and r.get("raw") is not None]
    first = [(r["verdict"] == "win") != bool(r["swapped"]) for r in shown]
    lengths = {r["index"]: (r["len_candidate"], r["len_opponent"]) for r in records if "len_candidate" in r}
    unequal = [r for r in records if r["verdict"] in ("win", "loss") and "len_candidate" in r
               and r["len_candidate"] != r["len_opponent"]]
    longer = [(r["verdict"] == "win") == (r["len_candidate"] > r["len_opponent"]) for r in unequal]
    return {"first_wins": 100 * float(np.mean(first)) if first else None, "first_n": len(first),
            "chars_candidate": float(np.mean([c for c, _ in lengths.values()])) if lengths else None,
            "chars_opponent": float(np.mean([o for _, o in lengths.values()])) if lengths else None,
            "longer_wins": 100 * float(np.mean(longer)) if longer else None, "longer_n": len(longer)}


def win_rate_row(records: Sequence[dict], resamples: int, seed: int, scores: dict[int, float] | None = None) -> dict:
    """Tie-adjusted win rate in percent with its bootstrap interval, N, errors, position and length stats."""
    scores = prompt_scores(records) if scores is None else scores
    values = np.array([scores[i] for i in sorted(scores)])
    low, high = bootstrap_ci(values, resamples, seed)
    return {"win_rate": 100 * float(values.mean()) if len(values) else math.nan,
            "ci_low": 100 * low, "ci_high": 100 * high, "n": len(values),
            "errors": sum(r["verdict"] == "error" for r in records), **side_stats(records)}


def compute_report(records: Sequence[dict], resamples: int = 10_000, seed: int = 0,
                   table1: Sequence[dict] = ()) -> dict:
    """Everything `report` prints, as plain data: {"win_rates": [...], "agreement": [...], "table1": [...]}."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["candidate"], r["opponent"], r["judge"])].append(r)
    win_rates, agreement, pairs = [], [], defaultdict(list)
    for cand, opp, judge in sorted(groups):
        pairs[(cand, opp)].append(judge)
    for (cand, opp), judges in pairs.items():
        for judge in judges:
            win_rates.append({"candidate": cand, "opponent": opp, "judge": judge,
                              **win_rate_row(groups[(cand, opp, judge)], resamples, seed)})
        if len(judges) < 2:
            continue
        scores = {j: prompt_scores(groups[(cand, opp, j)]) for j in judges}
        common = sorted(set.intersection(*(set(s) for s in scores.values())))
        mean = {i: float(np.mean([scores[j][i] for j in judges])) for i in common}  # per-prompt mean over judges
        recs = [r for j in judges for r in groups[(cand, opp, j)]]
        row = win_rate_row(recs, resamples, seed, mean)
        win_rates.append({"candidate": cand, "opponent": opp, "judge": f"mean of {len(judges)} judges", **row})
        majority = {}
        for j in judges:
            per = defaultdict(list)
            for r in groups[(cand, opp, j)]:
                per[r["index"]].append(r["verdict"])
            majority[j] = {i: majority_verdict(per[i]) for i in common}
        for a_i, a in enumerate(judges):
            for b in judges[a_i + 1:]:
                va, vb = [majority[a][i] for i in common], [majority[b][i] for i in common]
                agreement.append({"candidate": cand, "opponent": opp, "judge_1": a, "judge_2": b, "n": len(common),
                                  "agreement": 100 * float(np.mean([x == y for x, y in zip(va, vb)])) if common
                                  else math.nan, "kappa": cohen_kappa(va, vb)})
    return {"win_rates": win_rates, "agreement": agreement,
            "table1": [table1_row(spec, win_rates) for spec in table1]}


TABLE1_COLUMNS = [("instruct", "base", "Instruct vs Base"), ("cme", "base", "CME vs Base"),
                  ("cme", "instruct", "CME vs Instruct"), ("base", "ref", "Base vs Ref"),
                  ("cme", "ref", "CME vs Ref"), ("instruct", "ref", "Instruct vs Ref")]


def _cell(win_rates: Sequence[dict], a: str, b: str) -> dict | None:
    """Win rate of model a against model b, from a-vs-b rows or flipped from b-vs-a rows; the mean over
    judges where there are several."""
    def pick(cand, opp):
        rows = [r for r in win_rates if r["candidate"] == cand and r["opponent"] == opp]
        mean = [r for r in rows if r["judge"].startswith("mean of")]
        return mean[0] if mean else rows[0] if rows else None
    row = pick(a, b)
    if row:
        return {"win_rate": row["win_rate"], "ci_low": row["ci_low"], "ci_high": row["ci_high"], "n": row["n"]}
    row = pick(b, a)
    if row:
        return {"win_rate": 100 - row["win_rate"], "ci_low": 100 - row["ci_high"], "ci_high": 100 - row["ci_low"],
                "n": row["n"]}
    return None


def parse_table1(spec: str) -> dict:
    """ "label=Qwen2.5-0.5B,cme=NAME,base=NAME,instruct=NAME,ref=NAME[,start=base|instruct]" -> dict."""
    try:
        d = dict(part.split("=", 1) for part in spec.split(","))
    except ValueError:
        raise ValueError(f"--table1 {spec!r}: expected comma-separated key=value pairs") from None
    unknown = set(d) - {"label", "cme", "base", "instruct", "ref", "start"}
    if unknown or "cme" not in d:
        raise ValueError(f"--table1 {spec!r}: needs cme=NAME; known keys label, cme, base, instruct, ref, start")
    d.setdefault("start", "base")
    d.setdefault("label", d["cme"])
    if d["start"] not in ("base", "instruct"):
        raise ValueError(f"--table1 {spec!r}: start must be base or instruct")
    return d


def table1_row(spec: dict, win_rates: Sequence[dict]) -> dict:
    """One Table-1 row: the six comparisons (mean over judges where several), and Delta = CME vs X
    minus start vs X in the vs-Base and vs-Ref columns, start being the checkpoint CME-GRPO began from."""
    row = {"label": spec["label"]}
    for a, b, title in TABLE1_COLUMNS:
        cell = _cell(win_rates, spec[a], spec[b]) if a in spec and b in spec else None
        if cell and a == "cme" and b in ("base", "ref") and spec["start"] != b and spec["start"] in spec:
            start = _cell(win_rates, spec[spec["start"]], spec[b])
            cell["delta"] = cell["win_rate"] - start["win_rate"] if start else None
        row[title] = cell
    return row


# --- report: formatting --------------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def report_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows of strings) tables."""
    tables = []
    rows = [[r["candidate"], r["opponent"], r["judge"], _fmt(r["win_rate"]),
             f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", str(r["n"]), str(r["errors"]),
             _fmt(r["first_wins"]), _fmt(r["chars_candidate"], 0), _fmt(r["chars_opponent"], 0),
             _fmt(r["longer_wins"])] for r in report["win_rates"]]
    tables.append(("Tie-adjusted win rate of the candidate, % (wins + ties/2) / N, N prompts; 95% bootstrap "
                   "interval over prompts",
                   ["candidate", "opponent", "judge", "win rate", "95% CI", "N", "errors", "first shown wins %",
                    "chars cand", "chars opp", "longer wins %"], rows))
    if report["agreement"]:
        rows = [[r["candidate"], r["opponent"], r["judge_1"], r["judge_2"], str(r["n"]), _fmt(r["agreement"]),
                 _fmt(r["kappa"], 3)] for r in report["agreement"]]
        tables.append(("Agreement between judges on per-prompt majority verdicts",
                       ["candidate", "opponent", "judge 1", "judge 2", "N", "agreement %", "Cohen's kappa"], rows))
    if report["table1"]:
        header = ["generator"] + [t for _, _, t in TABLE1_COLUMNS]
        rows = []
        for r in report["table1"]:
            cells = [r["label"]]
            for _, _, title in TABLE1_COLUMNS:
                c = r[title]
                text = "-" if c is None else _fmt(c["win_rate"])
                if c and c.get("delta") is not None:
                    text += f" (Δ{c['delta']:+.1f})"
                cells.append(text)
            rows.append(cells)
        tables.append(("Table 1 style: win rate of the first model, %, mean over judges", header, rows))
    for t in report.get("tables", ()):  # more tables a caller built (reproduce.py's Table 2, Figure 3)
        tables.append((t["title"], t["header"], t["rows"]))
    return tables


def _no_nan(x):
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def format_report(report: dict, fmt: str = "text") -> str:
    """The report as an aligned text table, markdown, CSV (tables separated by a blank line) or JSON."""
    if fmt == "json":
        return json.dumps(_no_nan(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    out = []
    for title, header, rows in report_tables(report):
        if fmt == "text":
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows]]
            out.append(f"{title}\n" + "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]]))
        elif fmt == "markdown":
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(x.replace("|", "\\|") for x in row) + " |" for row in rows]
            out.append(f"**{title}**\n\n" + "\n".join(lines))
        elif fmt == "csv":
            import csv
            import io
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows([header, *rows])
            out.append(buf.getvalue().rstrip("\n"))
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return "\n\n".join(out) + "\n"


def plot_win_rates(report: dict, path: Path, title: str = "") -> list[dict]:
    """Win-rate bars with their 95% bootstrap intervals: one group per comparison (candidate vs
    opponent), one bar per judge and, where several judged, one for their mean. Written to `path` (PNG).

    report: compute_report's dict. Returns the bars drawn, [{candidate, opponent, judge, x, win_rate,
    ci_low, ci_high}], in drawing order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["candidate"], r["opponent"]) for r in report["win_rates"]))
    if not groups:
        raise ValueError("no judgments to plot")
    judges = list(dict.fromkeys(r["judge"] for r in report["win_rates"]))
    cell = {(r["candidate"], r["opponent"], r["judge"]): r for r in report["win_rates"]}
    width, bars = 0.8 / len(judges), []
    fig, ax = plt.subplots(figsize=(min(18.0, max(5.0, 1.5 + (0.5 + 0.3 * len(judges)) * len(groups))), 3.8))
    for k, judge in enumerate(judges):
        xs, ys, err = [], [], [[], []]
        for g, (cand, opp) in enumerate(groups):
            r = cell.get((cand, opp, judge))
            if r is None or not np.isfinite(r["win_rate"]):
                continue
            xs.append(g - 0.4 + width * (k + 0.5))
            ys.append(r["win_rate"])
            bars.append({"candidate": cand, "opponent": opp, "judge": judge, "x": xs[-1], "win_rate": ys[-1],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"]})
            err[0].append(max(0.0, r["win_rate"] - r["ci_low"]) if np.isfinite(r["ci_low"]) else 0.0)
            err[1].append(max(0.0, r["ci_high"] - r["win_rate"]) if np.isfinite(r["ci_high"]) else 0.0)
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=judge,
               hatch="//" if judge.startswith("mean of") else None)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [f"{c}\nvs {o}" if o else c for c, o in groups], fontsize=8)
    ax.set_ylabel("win rate, % (95% CI)")
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return bars


# --- cme: the diagnostic of Figure 1 -------------------------------------------------------------------

def token_surprise(verifier, instruction: str, output: str) -> tuple[list[str], np.ndarray]:
    """The response's verifier tokens as text pieces and their surprise -log p (nats): (S,) float64.

    A character split across tokens (byte-fallback pieces of an emoji, say) is shown with the token
    that holds its first byte, so the pieces join to the response exactly; the others show as "".
    """
    from reward import encode_pair

    v = encode_pair(verifier.tokenizer, instruction, output)
    logp = verifier.logprobs([v.ids], [v.response])[0]
    data = output.encode("utf-8")

    def boundary(k: int) -> int:  # the first character start at or after byte k
        while k < len(data) and data[k] & 0xC0 == 0x80:
            k += 1
        return k
    pieces = [data[boundary(a):boundary(b)].decode("utf-8") for a, b in v.spans]
    return pieces, -logp


def heatmap_html(pieces: Sequence[str], surprise: np.ndarray, title: str, subtitle: str = "") -> str:
    """A self-contained HTML page: each token on a background whose redness grows with its surprise."""
    import html
    vmax = max(float(np.percentile(surprise, 95)) if len(surprise) else 1.0, 1e-6)
    spans = []
    for piece, s in zip(pieces, surprise):
        alpha = min(1.0, float(s) / vmax)
        spans.append(f'<span title="-log p = {s:.2f}" style="background:rgba(220,40,40,{alpha:.2f})">'
                     f"{html.escape(piece)}</span>")
    return ("<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
            ".r{white-space:pre-wrap;font-family:monospace;line-height:1.7}</style>"
            f"<h2>{html.escape(title)}</h2><p>{html.escape(subtitle)}</p>"
            f"<p>Per-token surprise -log p under the verifier (nats); full red = {vmax:.2f} or more (the 95th "
            "percentile). Hover a token for its value.</p>"
            f"<div class='r'>{''.join(spans)}</div>\n")


def heatmap_png(pieces: Sequence[str], surprise: np.ndarray, title: str, path: Path, width: int = 90) -> None:
    """The same heatmap as a PNG: tokens laid out in a monospace grid of `width` columns, wrapped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import warnings

    vmax = max(float(np.percentile(surprise, 95)) if len(surprise) else 1.0, 1e-6)
    cells, x, y = [], 0, 0  # (x, y, text, surprise) in character cells
    for piece, s in zip(pieces, surprise):
        for k, line in enumerate(piece.split("\n")):
            if k:
                x, y = 0, y + 1
            while line:
                take = line[:width - x]
                cells.append((x, y, take, float(s)))
                x += len(take)
                line = line[len(take):]
                if x >= width:
                    x, y = 0, y + 1
    rows = y + 1
    fig = plt.figure(figsize=(width * 0.1 + 0.4, 0.7 + rows * 0.2))  # a cell is 0.1 x 0.2 inches
    ax = fig.add_axes([0.2 / (width * 0.1 + 0.4), 0.1 / (0.7 + rows * 0.2), width * 0.1 / (width * 0.1 + 0.4),
                       rows * 0.2 / (0.7 + rows * 0.2)])
    ax.set_xlim(0, width)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for rare scripts
        for cx, cy, text, s in cells:
            ax.add_patch(plt.Rectangle((cx, cy), len(text), 1, color=(0.86, 0.16, 0.16, min(1.0, s / vmax)),
                                       linewidth=0))
            # 11.9 pt DejaVu Sans Mono advances 0.6 em = 7.2 pt = 0.1 in per character: one cell
            ax.text(cx, cy + 0.8, text.replace("$", r"\$"), fontsize=11.9, family="DejaVu Sans Mono")
        fig.suptitle(f"{title}\n(red: surprise -log p, full at {vmax:.1f} nats or more)", fontsize=11)
        fig.savefig(path, dpi=100)
    plt.close(fig)


def run_cme(outputs: Sequence[Path], verifier_name: str, heatmap: Sequence[int] = (), heatmap_dir: Path = Path("heatmaps"),
            heatmap_format: str = "html", limit: int | None = None, device: str | None = None,
            token_budget: int = 16384) -> list[dict]:
    """Mean sequence-level CME (Eq. 3) of each outputs file under the verifier, and heatmaps of chosen prompts.

    Returns one row per file: {file, generator, n, cme_mean, cme_se, empty}; heatmaps are written to
    heatmap_dir/<generator>-<index>.<html|png>.
    """
    from reward import Verifier, load_causal_lm

    files = [(Path(p), read_outputs(p)) for p in outputs]
    model, tok = load_causal_lm(verifier_name, device=device)
    verifier = Verifier(model, tok, token_budget=token_budget)
    rows = []
    for path, recs in files:
        chosen = [recs[i] for i in sorted(recs)][:limit]
        cme = verifier.sequence_cme([r["instruction"] for r in chosen], [r["output"] for r in chosen], progress=True)
        ok = cme[np.isfinite(cme)]
        rows.append({"file": str(path), "generator": chosen[0]["generator"], "n": len(ok),
                     "cme_mean": float(ok.mean()) if len(ok) else math.nan,
                     "cme_se": float(ok.std(ddof=1) / math.sqrt(len(ok))) if len(ok) > 1 else math.nan,
                     "empty": int(len(cme) - len(ok))})
        for i in heatmap:
            if i not in recs:
                raise ValueError(f"{path}: no output with index {i}")
            pieces, surprise = token_surprise(verifier, recs[i]["instruction"], recs[i]["output"])
            mean = float(surprise.mean()) if len(surprise) else math.nan
            title = f"{recs[i]['generator']}, prompt {i}: mean CE = {mean:.2f} nats/token"
            heatmap_dir.mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^\w.-]+", "_", recs[i]["generator"])
            target = heatmap_dir / f"{safe}-{i}.{heatmap_format}"
            if heatmap_format == "html":
                target.write_text(heatmap_html(pieces, surprise, title,
                                               f"verifier {verifier_name}; instruction: {recs[i]['instruction']}"),
                                  encoding="utf-8")
            else:
                heatmap_png(pieces, surprise, title, target)
            print(f"wrote {target}", file=sys.stderr)
    return rows


# --- main ----------------------------------------------------------------------------------------------

class _DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each flag's default, unless it has none or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        none = default is None or default is False or default is argparse.SUPPRESS or default == []
        if action.option_strings and not none and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = {"formatter_class": _DefaultsHelp}  # every flag's help shows its default

    g = sub.add_parser("generate", help="greedy outputs of one model on the AlpacaEval prompts, as JSONL", **fmt)
    g.add_argument("--model", required=True, help="hub id or local folder (e.g. a train.py checkpoint)")
    g.add_argument("--out", required=True, type=Path, help="outputs .jsonl; a rerun skips indices already there")
    g.add_argument("--prompts", default="alpaca_eval", help="'alpaca_eval' (from the hub) or a local .jsonl/.json")
    g.add_argument("--max-new-tokens", type=int, default=2048, help="response length limit, in tokens")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    g.add_argument("--name", help="the generator's name in the records (default: --model as given)")
    g.add_argument("--limit", type=int, help="only the first N prompts (default: all)")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model repo to run its own code")
    g.add_argument("--system-prompt", help="system prompt for the chat template: text, or \"\" for none "
                   "(default: the template's own, e.g. Qwen2.5's 'You are Qwen...'); as train.py's")

    j = sub.add_parser("judge", help="pairwise judgments of a candidate outputs file against an opponent's", **fmt)
    j.add_argument("candidate", type=Path, help="the candidate's outputs file")
    j.add_argument("opponent", type=Path, help="the opponent's outputs file")
    j.add_argument("--judge", action="append", required=True,
                   help="judge spec, repeatable: 'api:MODEL?base=URL&key=ENV_VAR&temperature=0' or 'hf:MODEL'")
    j.add_argument("--out", required=True, type=Path, help="judgments .jsonl, appended to; a rerun asks nothing twice")
    j.add_argument("--replicates", type=int, default=5, help="judgments per prompt and judge (the paper: 5)")
    j.add_argument("--seed", type=int, default=0, help="sets the A/B order of each (prompt, replicate)")
    j.add_argument("--template", type=Path, help="a judge prompt file with {instruction}, {response_a}, {response_b} "
                   "(default: the built-in JUDGE_TEMPLATE)")
    j.add_argument("--verdict-tries", type=int, default=3, help="asks per judgment while the answer has no verdict")
    j.add_argument("--limit", type=int, help="only the first N common indices (default: all)")
    j.add_argument("--device", help="device of a local judge (default: cuda when available)")

    r = sub.add_parser("report", help="win rates, intervals, agreement, position bias and length from judgments", **fmt)
    r.add_argument("judgments", nargs="+", help="judgment .jsonl files or folders of them")
    r.add_argument("--format", choices=["text", "markdown", "csv", "json"], default="text", help="output format")
    r.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--table1", action="append", default=[],
                   help="a Table-1 row: 'label=L,cme=NAME,base=NAME,instruct=NAME,ref=NAME[,start=base|instruct]'")
    r.add_argument("--plot", type=Path, help="also draw the win rates with their 95%% intervals to this .png: one "
                   "group per comparison, one bar per judge and their mean")

    c = sub.add_parser("cme", help="mean sequence CME (Eq. 3) of outputs files under a verifier; heatmaps", **fmt)
    c.add_argument("outputs", nargs="+", type=Path, help="outputs files")
    c.add_argument("--verifier", default="google/gemma-3-1b-it", help="hub id or local folder")
    c.add_argument("--heatmap", type=int, action="append", default=[], help="index of a prompt to draw, repeatable")
    c.add_argument("--heatmap-dir", type=Path, default=Path("heatmaps"), help="folder for the heatmaps")
    c.add_argument("--heatmap-format", choices=["html", "png"], default="html", help="heatmap file format")
    c.add_argument("--limit", type=int, help="only the first N outputs of each file (default: all)")
    c.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    v = sub.add_parser("convert", help="AlpacaEval per-prompt annotations -> judgment records", **fmt)
    v.add_argument("annotations", nargs="+", type=Path,
                   help=".jsonl(.gz) of {index, instruction, candidate, opponent, output_candidate, "
                        "output_opponent, ae_annotator, ae_p_candidate_preferred}")
    v.add_argument("--out", required=True, type=Path, help="judgments .jsonl, appended to (keys already there "
                   "are skipped); never one of the inputs")
    return p


# flags that count something, and their smallest sensible value, per subcommand
_AT_LEAST = {"generate": {"max_new_tokens": 1, "batch_size": 1, "limit": 1},
             "judge": {"replicates": 1, "verdict_tries": 1, "limit": 1},
             "report": {"bootstrap": 1},
             "cme": {"limit": 1}}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name, low in _AT_LEAST.get(args.command, {}).items():
            value = getattr(args, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
        if getattr(args, "device", None) is not None:
            from reward import check_device
            check_device(args.device)
        if getattr(args, "out", None) is not None and args.out.is_dir():
            raise ValueError(f"--out {args.out} is a folder; name a .jsonl file")
        if args.command == "generate":
            run_generate(args.model, args.out, args.prompts, args.max_new_tokens, args.batch_size, args.name,
                         args.limit, args.device, args.trust_remote_code, args.system_prompt)
        elif args.command == "judge":
            template = read_template(args.template) if args.template else JUDGE_TEMPLATE
            run_judge(args.candidate, args.opponent, args.judge, args.out, args.replicates, args.seed, template,
                      args.verdict_tries, args.limit, args.device)
        elif args.command == "report":
            table1 = [parse_table1(s) for s in args.table1]
            if args.plot is not None and args.plot.suffix.lower() != ".png":
                raise ValueError(f"--plot {args.plot}: name a .png file")
            report = compute_report(load_judgments(args.judgments), args.bootstrap, args.seed, table1)
            sys.stdout.write(format_report(report, args.format))
            if args.plot is not None:
                plot_win_rates(report, args.plot)
                print(f"plot: {args.plot}", file=sys.stderr)
        elif args.command == "cme":
            rows = run_cme(args.outputs, args.verifier, args.heatmap, args.heatmap_dir, args.heatmap_format,
                           args.limit, args.device)
            print(f"mean sequence CME (Eq. 3, nats per verifier token) under {args.verifier}")
            for row in rows:
                print(f"{row['generator']:<40} {row['cme_mean']:7.3f} ± {row['cme_se']:.3f} (SE)  N = {row['n']}"
                      + (f", {row['empty']} empty outputs left out" if row["empty"] else ""))
        elif args.command == "convert":
            run_convert(args.annotations, args.out)
    except KeyboardInterrupt:
        print("interrupted: everything completed so far is saved; rerun the same command to continue",
              file=sys.stderr)
        return 130
    except JudgeError as e:
        print(f"error: {e}; the judgments made so far are saved, rerun to continue", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
