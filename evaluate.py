"""Evaluation of CME-GRPO on AlpacaEval 2.0 prompts (Section 3, Appendix E): greedy outputs of each
model, pairwise LLM-as-judge comparisons, and the commands that report on them.

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
Here: the generation runs and judging runs, resumable line by line. Where the rest lives:
greedy decoding is sampling.py's, the judge itself (its prompt, its verdict, the API and local
backends) judge.py's, win rates and the report report.py's, the CME diagnostic of Figure 1 cme.py's.
Readings of, and additions to, the paper:
  1. Greedy means greedy: do_sample off and none of the checkpoint's generation_config processors
     (Qwen2.5-Instruct ships a repetition penalty of 1.05); prompts go through the model's chat template
     (`bos_token + "User: {prompt}\\nAssistant: "` without one, as in training).
  2. A/B order is a function of (seed, replicate, instruction) through SHA-256, so a rerun, another
     machine or another Python gives the same order (Python's hash() is salted per process).
  3. A judgment whose answer has no verdict after `--verdict-tries` attempts is recorded as an error
     (report.py leaves it out of N). Identical outputs are a tie without a call.

Shape letters: N prompts, R replicates, J judges.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from judge import JUDGE_TEMPLATE, Answer, JudgeError, JudgeSpec, judge_prompt, make_judge
from prompts import load_eval_prompts
from records import open_for_append, read_jsonl, read_outputs, write_record
from report import compute_report, format_report, load_judgments, parse_table1, plot_win_rates


# --- generate ------------------------------------------------------------------------------------------

def run_generate(model_name: str, out: Path, prompts_source: str = "alpaca_eval", max_new_tokens: int = 2048,
                 batch_size: int = 8, name: str | None = None, limit: int | None = None,
                 device: str | None = None, trust_remote_code: bool = False, system_prompt: str | None = None) -> int:
    """Write greedy outputs of a model to `out` as JSONL, skipping indices already there. Returns the count written.

    Each line: {index, instruction, output, generator, tokens (generated tokens before EOS),
    truncated (no EOS within max_new_tokens), max_new_tokens, system_prompt (null: the template's own)}.
    """
    from sampling import greedy_generate, load_generator  # torch loads here, not for report or judge

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
    from sampling import rendered_lengths

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


# --- main ----------------------------------------------------------------------------------------------

def read_template(path: Path) -> str:
    """A judge prompt template file, or one line naming it."""
    if not path.is_file():
        raise ValueError(f"template file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?)") from None


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
            from cme import run_cme
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
