"""One command per result of the paper: train, generate, judge, report, in one resumable run folder.

    python reproduce.py table1 --gen Qwen/Qwen2.5-0.5B --instruct Qwen/Qwen2.5-0.5B-Instruct \\
        --judge api:gpt-5.2 --judge "api:claude-sonnet-4-6?base=https://api.anthropic.com/v1&key=ANTHROPIC_API_KEY"
    python reproduce.py table2  ...same flags...        # CME-GRPO vs RENT (Table 2)
    python reproduce.py figure3 ...same flags... --verifiers google/gemma-3-270m-it,google/gemma-3-1b-it
    python reproduce.py table1 ... --dry-run            # the plan: stages, commands, what is done, the cost

Stages (each calls train.py's or evaluate.py's own code, never a copy):
  train-NAME     train.train with train.py's defaults (Appendix E) and the flags given
  generate-NAME  evaluate.run_generate: greedy outputs on the evaluation prompts (AlpacaEval's 805)
  judge-A_vs_B   evaluate.run_judge: every judge, --replicates times per prompt, A/B order randomised
  report         report.compute_report -> RESULT.{txt,md,csv,json} (and figure3.png)

Everything goes into one run folder (--out). A stage whose output is complete is skipped, and each
stage continues where it stopped (training resumes from its last checkpoint, generation and judging
skip what their files hold), so rerunning the same command after a crash or Ctrl-C finishes the job.
manifest.json records the command, every stage's configuration, package versions and the project's
git commit; a rerun that would change a started stage's configuration is refused, naming it.
Several results can share one folder: stages with the same name and configuration are reused.

Comparisons, each "first model vs second", win rate of the first:
  table1   cme vs base, cme vs instruct, instruct vs base, base vs ref, cme vs ref, instruct vs ref
  table2   cme and rent, each vs base and vs instruct
  figure3  cme with each verifier (and a random-weight control) vs base and vs instruct
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "datasets", "huggingface_hub", "tqdm")


@dataclass
class Stage:
    """One step of a pipeline.

    name: unique in the run folder. command: the equivalent command line (for the reader and the
    manifest). inputs, outputs: paths or ids. config: everything that decides the output (compared with
    the manifest on a rerun). run: does (the rest of) the work. progress: () -> (units done, units in
    all). unit: what a unit is ("steps", "outputs", "judge calls"). seconds_per_unit: measured, or None.
    basis: how the units were counted and what one costs depends on (for the dry run's prices).
    """
    name: str
    command: str
    inputs: list
    outputs: list
    config: dict
    run: Callable[[], None]
    progress: Callable[[], tuple[int, int]]
    unit: str
    seconds_per_unit: Callable[[], float | None] = lambda: None
    basis: dict = field(default_factory=dict)


# --- the stages ---------------------------------------------------------------------------------------

def _quote(x) -> str:
    s = str(x)
    return s if re.fullmatch(r"[\w./:@=+-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def train_stage(run: Path, name: str, cfg) -> Stage:
    """CME-GRPO (or RENT) training into run/train/NAME; done when train() has returned (DONE names the final
    checkpoint). Its config is every setting that changes what is computed (config.RESUME_MAY_CHANGE are
    not), and --max-steps: the outputs made from a finished run must not change under it."""
    from config import RESUME_MAY_CHANGE, Config
    from train import train

    out = run / "train" / name
    cfg = replace(cfg, out=str(out), resume=False)
    steps, counted = planned_steps(cfg)
    flags = [f"--{f.name.replace('_', '-')} {_quote(getattr(cfg, f.name))}" for f in fields(Config)
             if getattr(cfg, f.name) != f.default and f.name not in ("out", "resume")]

    def checkpoints() -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())

    def progress():
        if (out / "DONE").exists():
            return steps, steps
        return min(max(checkpoints(), default=0), steps - 1), steps

    def work():
        train(replace(cfg, resume=bool(checkpoints())))
        (out / "DONE").write_text(f"checkpoint-{max(checkpoints())}\n")

    def seconds():
        metrics = out / "metrics.jsonl"
        times = [json.loads(x)["step_time"] for x in metrics.read_text().splitlines() if x.strip()] \
            if metrics.exists() else []
        return sum(times) / len(times) if times else None

    return Stage(f"train-{name}", f"python train.py {' '.join(flags)} --out {out}", [cfg.gen, cfg.verifier, cfg.prompts],
                 [str(out)], {k: v for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE - {"max_steps"}},
                 work, progress, "steps", seconds,
                 {"counted": counted, "bench": f"python bench_train.py --device cuda --paper --prompts-per-step "
                  f"{cfg.prompts_per_step} --group-size {cfg.group_size} --max-new-tokens {cfg.max_new_tokens}",
                  "settings": f"{cfg.prompts_per_step} prompts x G = {cfg.group_size}, up to {cfg.max_new_tokens} "
                              f"new tokens, {cfg.reward} reward"})


def final_checkpoint(run: Path, name: str) -> str:
    """The model a finished train stage produced (its path, for the generate stage, which runs after it)."""
    return str(run / "train" / name / (run / "train" / name / "DONE").read_text().strip())


def planned_steps(cfg) -> tuple[int, str]:
    """(optimizer steps a training config will run, how they were counted). A local prompt file is read
    and, when the generator is a local folder, its prompts that train.fit_context drops (too long for the
    context or --max-prompt-tokens) are left out, as training leaves them out; a hub dataset is assumed
    to hold at least --num-prompts, as UltraFeedback's 64k prompts do."""
    from train import fit_context, load_prompts

    if not Path(cfg.prompts).is_file():
        n, how = cfg.num_prompts, f"assuming {cfg.prompts} holds --num-prompts {cfg.num_prompts} that all fit"
    else:
        prompts = load_prompts(cfg)
        n, how = len(prompts), f"{len(prompts)} prompts"
        if Path(cfg.gen).is_dir():
            from types import SimpleNamespace

            from transformers import AutoConfig, AutoTokenizer
            model = SimpleNamespace(config=AutoConfig.from_pretrained(cfg.gen))  # the context, without the weights
            n = len(fit_context(prompts, AutoTokenizer.from_pretrained(cfg.gen), model, cfg, verbose=False))
            how = f"{n} of {len(prompts)} prompts fit the context and --max-prompt-tokens"
        else:
            how += " (the ones the context drops are not known without the generator's files)"
    total = (n // cfg.prompts_per_step) * cfg.epochs
    return (min(total, cfg.max_steps) if cfg.max_steps > 0 else total), how


def generate_stage(run: Path, name: str, model: Callable[[], str] | str, model_id: str, args) -> Stage:
    """Greedy outputs of `name` on the evaluation prompts into run/outputs/NAME.jsonl."""
    from evaluate import run_generate

    out = run / "outputs" / f"{name}.jsonl"
    total = eval_prompt_count(args)

    def progress():
        return min(_lines(out), total), total

    def work():
        run_generate(model() if callable(model) else model, out, args.eval_prompts, args.max_new_tokens,
                     args.batch_size, name=name, limit=args.eval_limit, device=args.device)

    limit = f" --limit {args.eval_limit}" if args.eval_limit else ""
    return Stage(f"generate-{name}", f"python evaluate.py generate --model {_quote(model_id)} --name {name} "
                 f"--prompts {_quote(args.eval_prompts)} --max-new-tokens {args.max_new_tokens}{limit} --out {out}",
                 [model_id, args.eval_prompts], [str(out)],
                 {"model": model_id, "prompts": args.eval_prompts, "limit": args.eval_limit,
                  "max_new_tokens": args.max_new_tokens}, work, progress, "outputs")


def judge_stage(run: Path, first: str, second: str, args) -> Stage:
    """Every judge's --replicates verdicts per prompt of `first` vs `second` into run/judgments/."""
    from evaluate import run_judge

    a, b = run / "outputs" / f"{first}.jsonl", run / "outputs" / f"{second}.jsonl"
    out = run / "judgments" / f"{first}_vs_{second}.jsonl"
    total = eval_prompt_count(args) * args.replicates * len(args.judge)

    def progress():
        return min(_lines(out), total), total

    def work():
        run_judge(a, b, args.judge, out, args.replicates, args.seed, limit=args.eval_limit, device=args.device)

    judges = " ".join(f"--judge {_quote(j)}" for j in args.judge)
    return Stage(f"judge-{first}_vs_{second}", f"python evaluate.py judge {a} {b} {judges} --replicates "
                 f"{args.replicates} --seed {args.seed} --out {out}", [str(a), str(b)], [str(out)],
                 {"judges": list(args.judge), "replicates": args.replicates, "seed": args.seed,
                  "limit": args.eval_limit}, work, progress, "judge calls")


def _lines(path: Path) -> int:
    """Complete lines of a JSONL file (0 when absent)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def eval_prompt_count(args) -> int:
    """How many evaluation prompts the run uses (805 for AlpacaEval from the hub, without reading it)."""
    if args.eval_prompts == "alpaca_eval":
        n = 805
    else:
        from prompts import load_eval_prompts
        n = len(load_eval_prompts(args.eval_prompts))
    return min(n, args.eval_limit) if args.eval_limit else n


# --- the three results --------------------------------------------------------------------------------

TABLE1 = [("cme", "base"), ("cme", "instruct"), ("instruct", "base"), ("base", "ref"), ("cme", "ref"),
          ("instruct", "ref")]
TABLE2 = [("cme", "base"), ("rent", "base"), ("cme", "instruct"), ("rent", "instruct")]


def train_config(args, **overrides):
    """train.py's Config: its defaults (Appendix E), the shrinking flags, --train KEY=VALUE, then overrides."""
    from config import Config

    cfg = replace(Config(), gen=args.gen, verifier=args.verifier, seed=args.seed, device=args.device)
    for key, value in (("prompts", args.prompts), ("num_prompts", args.num_prompts), ("max_steps", args.max_steps),
                       ("max_new_tokens", args.max_new_tokens)):
        if value is not None:
            cfg = replace(cfg, **{key: value})
    cfg = replace(cfg, **args.train, **overrides)
    if args.max_new_tokens is None:
        args.max_new_tokens = cfg.max_new_tokens  # evaluation generates as long as training did
    return cfg


def plan(target: str, run: Path, args) -> tuple[list[Stage], Callable[[], dict]]:
    """The stages of `target` and a function building its report from the judgments."""
    from report import compute_report, load_judgments, parse_table1

    cfg = train_config(args)
    models = {"base": args.gen, "instruct": args.instruct}
    stages = []
    if target in ("table1", "table2"):
        pairs = TABLE1 if target == "table1" else TABLE2
        if target == "table1":
            models["ref"] = args.ref
        trained = {"cme": cfg} if target == "table1" else {"cme": cfg, "rent": replace(cfg, reward="rent")}
    else:
        conditions = {"random": args.random_verifier or args.verifiers[0], **{_slug(v): v for v in args.verifiers}}
        trained = {f"cme-{c}": replace(cfg, verifier=v, verifier_init="random" if c == "random" else "pretrained")
                   for c, v in conditions.items()}
        pairs = [(name, other) for name in trained for other in ("base", "instruct")]
    from config import check_config
    for name, c in trained.items():
        # one line naming a bad setting, before anything runs; a dry run may plan for a GPU this machine lacks
        check_config(replace(c, device="cpu") if args.dry_run else c)
        stages.append(train_stage(run, name, c))
    for name, model in models.items():
        stages.append(generate_stage(run, name, model, model, args))
    for name in trained:
        stages.append(generate_stage(run, name, lambda n=name: final_checkpoint(run, n),
                                     str(run / "train" / name / "checkpoint-<final>"), args))
    for first, second in pairs:
        stages.append(judge_stage(run, first, second, args))

    def report() -> dict:
        files = [run / "judgments" / f"{a}_vs_{b}.jsonl" for a, b in pairs]
        spec = [parse_table1(f"label={_slug(args.gen)},cme=cme,base=base,instruct=instruct,ref=ref")] \
            if target == "table1" else []
        rep = compute_report(load_judgments(files), args.bootstrap, args.seed, spec)
        if target == "table2":
            rep["tables"] = [result_table("Table 2 style: win rate, %, mean over judges", rep,
                                          [(_slug(args.gen), "cme", "rent")], ["vs Base", "vs Instruct"])]
        elif target == "figure3":
            rows = [(c, f"cme-{c}", None) for c in conditions]
            rep["tables"] = [result_table("Figure 3: CME-GRPO win rate by verifier, %, mean over judges [95% CI]",
                                          rep, rows, ["vs Base", "vs Instruct"])]
        return rep
    return stages, report


def result_table(title: str, report: dict, rows: list, columns: list[str]) -> dict:
    """A table of mean-over-judges win rates: each row (label, model, optional second model), each
    column "vs Base" / "vs Instruct"; with a second model each column gets a cell per model."""
    from report import fmt_value, win_rate_of

    header, body = ["row"], []
    for label, first, second in rows:
        cells = [label]
        for col in columns:
            opponent = "base" if col == "vs Base" else "instruct"
            for model in (first, second) if second else (first,):
                c = win_rate_of(report["win_rates"], model, opponent)
                cells.append("-" if c is None else f"{fmt_value(c['win_rate'])} [{fmt_value(c['ci_low'])}, {fmt_value(c['ci_high'])}]")
                if len(header) < len(cells):
                    header.append(f"{model} {col}" if second else col)
        body.append(cells)
    return {"title": title, "header": header, "rows": body}


def _slug(name: str) -> str:
    """A model id or path as a short file-safe label: "google/gemma-3-1b-it" -> "gemma-3-1b-it"."""
    return re.sub(r"[^\w.-]+", "_", Path(str(name).rstrip("/")).name) or "model"


# --- manifest, dry run, run ----------------------------------------------------------------------------

def environment() -> dict:
    """Package versions, Python, and the project's git commit (with a note when the tree has changes)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = version(p)
        except PackageNotFoundError:
            versions[p] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return {"python": sys.version.split()[0], "packages": versions, "git_commit": commit,
            "git_dirty": dirty if commit else None}


def check_manifest(run: Path, stages: list[Stage]) -> dict:
    """The run folder's manifest; refuses stages whose configuration differs from the recorded one."""
    path = run / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"stages": {}, "commands": []}
    for s in stages:
        was = manifest["stages"].get(s.name, {}).get("config")
        if was is not None and was != json.loads(json.dumps(s.config)):
            keys = sorted(k for k in set(was) | set(s.config) if was.get(k) != s.config.get(k))
            raise ValueError(f"{run}: stage {s.name} was started with other settings ({', '.join(keys)}: "
                             f"{', '.join(f'{was.get(k)!r} -> {s.config.get(k)!r}' for k in keys)}); rerun "
                             "with the same flags, or choose another --out")
    return manifest


def write_manifest(run: Path, manifest: dict) -> None:
    tmp = run / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    tmp.replace(run / "manifest.json")


def cost(stage: Stage, args) -> str:
    """What the rest of a stage will cost: GPU time from a measured step time, or its calls and tokens."""
    done, total = stage.progress()
    left = total - done
    if stage.unit == "steps":
        b = stage.basis
        measured = stage.seconds_per_unit()
        per, source = (measured, "measured on this stage's own steps") if measured else \
            (args.step_seconds, f"--step-seconds, taken to be one step at this stage's settings: {b['settings']}")
        if per is None:
            return (f"{left} steps ({b['counted']}); time unknown: measure a step at this stage's settings "
                    f"({b['bench']}) and pass --step-seconds")
        hours = "GPU-hours" if args.device != "cpu" else "CPU-hours"
        return f"{left} steps ({b['counted']}) x {per:.1f} s ({source}) = {left * per / 3600:.2f} {hours}"
    if stage.unit == "outputs":
        return f"{left} greedy outputs of up to {args.max_new_tokens} tokens"
    return f"{left:,} judge calls (identical output pairs are ties without a call)"


def describe(stages: list[Stage], args) -> str:
    lines, calls = [], 0
    for s in stages:
        done, total = s.progress()
        status = "done" if done >= total else f"{done} of {total} {s.unit}" if done else "to do"
        lines += [f"[{status}] {s.name}", f"    {s.command}", f"    in:  {', '.join(map(str, s.inputs))}",
                  f"    out: {', '.join(s.outputs)}", f"    cost: {cost(s, args)}"]
        calls += (total - done) if s.unit == "judge calls" else 0
    lines.append(f"judge calls to make: {calls:,}")
    return "\n".join(lines)


def write_results(run: Path, target: str, report: dict) -> list[Path]:
    """RESULT.txt/.md/.csv/.json from the report (and figure3.png for figure3)."""
    from report import format_report, plot_win_rates

    if not report["win_rates"]:
        raise ValueError(f"{target}: no judgments to report in {run / 'judgments'} (a judge stage wrote none); "
                         "check the judges and rerun")
    written = []
    for ext, fmt in (("txt", "text"), ("md", "markdown"), ("csv", "csv"), ("json", "json")):
        path = run / f"{target}.{ext}"
        path.write_text(format_report(report, fmt))
        written.append(path)
    if target == "figure3":  # Figure 3's layout: a group per verifier, a bar each vs Base and vs Instruct
        judges = sorted({r["judge"] for r in report["win_rates"]})
        shown = next((j for j in judges if j.startswith("mean of")), judges[0])  # the judges' mean if any
        bars = [dict(r, candidate=r["candidate"].removeprefix("cme-"), opponent="", judge=f"vs {r['opponent']}")
                for r in report["win_rates"] if r["judge"] == shown]
        plot_win_rates({"win_rates": bars}, run / "figure3.png", f"CME-GRPO win rate by verifier ({shown})")
        written.append(run / "figure3.png")
    return written


def reproduce(target: str, args) -> dict | None:
    """Run (or, with args.dry_run, describe) every stage of `target`; returns the report (None on a dry run)."""
    run = Path(args.out)
    stages, report = plan(target, run, args)
    manifest = check_manifest(run, stages)
    if args.dry_run:
        print(describe(stages, args))
        return None
    run.mkdir(parents=True, exist_ok=True)
    manifest["commands"].append({"argv": sys.argv, "target": target, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 **environment()})
    for s in stages:
        entry = manifest["stages"].setdefault(s.name, {})
        entry.update(command=s.command, config=s.config, inputs=s.inputs, outputs=s.outputs)
    write_manifest(run, manifest)
    for k, s in enumerate(stages, 1):
        done, total = s.progress()
        if done >= total:
            print(f"[{k}/{len(stages)}] {s.name}: done", file=sys.stderr)
            continue
        print(f"[{k}/{len(stages)}] {s.name}: {done} of {total} {s.unit} done; {s.command}", file=sys.stderr)
        start = time.time()
        s.run()
        manifest["stages"][s.name]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        manifest["stages"][s.name]["seconds"] = round(time.time() - start + manifest["stages"][s.name].get("seconds", 0), 1)
        write_manifest(run, manifest)
    result = report()
    from report import format_report
    sys.stdout.write(format_report(result, "text"))
    for path in write_results(run, target, result):
        print(f"wrote {path}", file=sys.stderr)
    return result


# --- command line -------------------------------------------------------------------------------------

def _train_setting(text: str) -> tuple[str, object]:
    """--train KEY=VALUE -> (field, value typed like config.Config's field)."""
    from config import Config

    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    types = {f.name: type(f.default) for f in fields(Config)}
    if not sep or key not in types:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY a train.py flag (e.g. lr=1e-6)")
    kind = types[key]
    choices = next(f.metadata.get("choices") for f in fields(Config) if f.name == key)
    if choices and value not in choices:
        raise argparse.ArgumentTypeError(f"--train {text!r}: {key} must be one of {', '.join(choices)}")
    try:
        if kind is bool:
            typed = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
        else:
            typed = kind(value) if kind in (int, float, str) else value
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"--train {text!r}: {value!r} is not a {kind.__name__}") from None
    return key, typed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run folder, stages and resuming: see the module docstring (python -c "
                                        "'import reproduce; help(reproduce)').")
    ap.add_argument("target", choices=["table1", "table2", "figure3"], help="the result to reproduce")
    ap.add_argument("--gen", required=True, help="the pretrained generator CME-GRPO starts from (hub id or folder)")
    ap.add_argument("--instruct", required=True, help="its instruction-tuned sibling (the Instruct baseline)")
    ap.add_argument("--ref", default="google/gemma-3-1b-it", help="table1's reference model (default %(default)s; "
                    "the paper uses meta-llama/Llama-3.2-1B-Instruct for Qwen2.5-0.5B-Instruct and gemma-3-1b-pt)")
    ap.add_argument("--verifier", default="google/gemma-3-1b-it", help="CME-GRPO's verifier (default %(default)s)")
    ap.add_argument("--verifiers", type=lambda s: [v for v in s.split(",") if v], default=[],
                    help="figure3: comma-separated verifiers to sweep")
    ap.add_argument("--random-verifier", help="figure3: the architecture of the random-weight control (default: "
                    "the first of --verifiers)")
    ap.add_argument("--judge", action="append", default=[], help="a judge spec (evaluate.py judge's), repeatable")
    ap.add_argument("--out", help="run folder (default runs/TARGET-GEN)")
    ap.add_argument("--dry-run", action="store_true", help="print the stages, what is done, and the cost; run nothing")
    g = ap.add_argument_group("shrinking (defaults: the paper's)")
    g.add_argument("--prompts", help="training prompts (default: train.py's, UltraFeedback)")
    g.add_argument("--num-prompts", type=int, help="training prompts used (default: train.py's 5000)")
    g.add_argument("--max-steps", type=int, help="training steps (default: all, one epoch)")
    g.add_argument("--max-new-tokens", type=int, help="response limit in training and evaluation (default: train.py's)")
    g.add_argument("--eval-prompts", default="alpaca_eval", help="'alpaca_eval' (the hub's 805) or a .jsonl/.json")
    g.add_argument("--eval-limit", type=int, help="only the first N evaluation prompts")
    g.add_argument("--replicates", type=int, default=5, help="judgments per prompt and judge (default 5)")
    g.add_argument("--train", type=_train_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any other train.py setting, e.g. --train group_size=4 (repeatable)")
    o = ap.add_argument_group("running")
    o.add_argument("--device", default="auto", help="auto | cuda | cpu (default auto)")
    o.add_argument("--batch-size", type=int, default=8, help="generation batch (default 8)")
    o.add_argument("--seed", type=int, default=0, help="training seed, A/B order seed, bootstrap seed (default 0)")
    o.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    o.add_argument("--step-seconds", type=float, help="--dry-run: seconds per training step when no step was "
                   "measured yet in the run folder (e.g. from bench_train.py)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.train = dict(args.train)
    try:
        if not args.judge:
            raise ValueError("give at least one --judge (the paper uses two)")
        if args.target == "figure3" and not args.verifiers:
            raise ValueError("figure3 needs --verifiers V1,V2,...")
        for name in ("num_prompts", "max_steps", "max_new_tokens", "eval_limit", "replicates", "batch_size",
                     "bootstrap"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if args.step_seconds is not None and not (args.step_seconds > 0 and math.isfinite(args.step_seconds)):
            raise ValueError(f"--step-seconds {args.step_seconds}: must be a positive number")
        if args.device == "auto":
            import torch
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.out = args.out or f"runs/{args.target}-{_slug(args.gen)}"
        reproduce(args.target, args)
    except KeyboardInterrupt:
        print("interrupted: everything finished so far is kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
