"""Win rates from judgments (Section 3, Table 1, Appendix E): tie-adjusted win rates with bootstrap
intervals, agreement between judges, position bias and length, Table 1's rows, and the report in
text, markdown, CSV, JSON or as a plot.

    python evaluate.py report judgments/*.jsonl [--format markdown] [--plot wr.png]
    report = compute_report(load_judgments(["judgments/"]))
    print(format_report(report, "markdown"))

The paper's statistic: a prompt scores win 1, tie 1/2, loss 0; the win rate is (wins + ties/2) / N
over N prompts, and a Table 1 cell is the mean of the two judges. Readings of, and additions to, it:
  1. Replicates: a prompt's score is the mean over its replicates; N counts prompts. A judgment with
     no verdict is an error, left out of N; a prompt with only errors is left out.
  2. Statistics the paper does not report: 95% bootstrap intervals over prompts (replicates of a
     prompt resampled together), agreement between judges (raw and Cohen's kappa on per-prompt
     majority verdicts), position bias and length.

A judgment record (what evaluate.py judge and convert write): {key, index, candidate, opponent, judge,
verdict (win | tie | loss | error, from the candidate's side), swapped, raw, len_candidate, ...}.
Shape letters: N prompts, R replicates, J judges.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from records import read_jsonl

SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
VERDICTS = ("win", "tie", "loss", "error")

# --- statistics --------------------------------------------------------------------------------------

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


def win_rate_of(win_rates: Sequence[dict], a: str, b: str) -> dict | None:
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
        cell = win_rate_of(win_rates, spec[a], spec[b]) if a in spec and b in spec else None
        if cell and a == "cme" and b in ("base", "ref") and spec["start"] != b and spec["start"] in spec:
            start = win_rate_of(win_rates, spec[spec["start"]], spec[b])
            cell["delta"] = cell["win_rate"] - start["win_rate"] if start else None
        row[title] = cell
    return row


# --- formatting --------------------------------------------------------------------------------------

def fmt_value(value, digits: int = 1) -> str:
    """A number as table text: `digits` decimals for floats, "-" for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def report_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows of strings) tables."""
    tables = []
    rows = [[r["candidate"], r["opponent"], r["judge"], fmt_value(r["win_rate"]),
             f"[{fmt_value(r['ci_low'])}, {fmt_value(r['ci_high'])}]", str(r["n"]), str(r["errors"]),
             fmt_value(r["first_wins"]), fmt_value(r["chars_candidate"], 0), fmt_value(r["chars_opponent"], 0),
             fmt_value(r["longer_wins"])] for r in report["win_rates"]]
    tables.append(("Tie-adjusted win rate of the candidate, % (wins + ties/2) / N, N prompts; 95% bootstrap "
                   "interval over prompts",
                   ["candidate", "opponent", "judge", "win rate", "95% CI", "N", "errors", "first shown wins %",
                    "chars cand", "chars opp", "longer wins %"], rows))
    if report["agreement"]:
        rows = [[r["candidate"], r["opponent"], r["judge_1"], r["judge_2"], str(r["n"]), fmt_value(r["agreement"]),
                 fmt_value(r["kappa"], 3)] for r in report["agreement"]]
        tables.append(("Agreement between judges on per-prompt majority verdicts",
                       ["candidate", "opponent", "judge 1", "judge 2", "N", "agreement %", "Cohen's kappa"], rows))
    if report["table1"]:
        header = ["generator"] + [t for _, _, t in TABLE1_COLUMNS]
        rows = []
        for r in report["table1"]:
            cells = [r["label"]]
            for _, _, title in TABLE1_COLUMNS:
                c = r[title]
                text = "-" if c is None else fmt_value(c["win_rate"])
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
