"""What a training step records: its metrics line (metrics.jsonl), sample responses with per-token
verifier surprise (samples.jsonl), and the curves drawn from them (curves.png).

    record = step_record(rollout, adv, reward, cme, group_size, times)   # on every rank
    line = step_metrics(all_gather(record))                              # the union, as one process

Each rank contributes raw per-response values, so the statistics of a torchrun step are computed on
their union exactly as one process would compute them (never a mean of means).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from align import decode_response, token_bytes


def shared_share(rollout, group_size: int) -> float:
    """Share of response positions where every response of the group has the same tokens so far
    (a common opening); their rewards are identical by construction (reward.py, item 6), so A = 0.

    rollout: a sampling.Rollout of whole groups of group_size responses."""
    shared = 0
    for g in range(0, rollout.response.shape[0], group_size):
        ids, mask = rollout.response[g:g + group_size], rollout.mask[g:g + group_size]
        same = ((ids == ids[:1]) & mask).all(0)                     # (T,) equal and present in all
        shared += group_size * int(same.cumprod(0).sum())           # the common prefix's length
    return shared / max(int(rollout.mask.sum()), 1)


# --- collapse: repetition and sameness, measured on the rollouts as they happen ------------------------

def distinct(words: list, n: int) -> float:
    """Distinct-n of one response: unique n-grams / n-grams (nan when it has fewer than n items)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def mean_distinct(responses: list[list], n: int) -> float:
    """Mean distinct-n over the responses that have at least n items (nan when none has)."""
    values = [d for d in (distinct(w, n) for w in responses) if not np.isnan(d)]
    return float(np.mean(values)) if values else float("nan")


def repeated_share(ids: list, n: int = 4) -> float:
    """Share of a response's token n-grams that already occurred earlier in it (nan below n tokens).
    On the generator's token ids, so a loop with no spaces ("kakakaka") counts, as words would not."""
    seen, repeats, grams = set(), 0, [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else float("nan")


def compression_ratio(text: str) -> float:
    """zlib-compressed bytes / UTF-8 bytes of a text (nan when empty): repetition compresses, so a loop
    scores low (0.17 for the syllable loops of the random-verifier run, 0.55 for SmolLM2's answers)."""
    import zlib

    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else float("nan")


COLLAPSE_KEYS = ("distinct_1", "distinct_2", "repeated_4gram", "compression", "bytes_per_token", "identical_groups",
                 "len_to_limit")
"""The metrics line's collapse measures: within-response distinct-1/2 (words), the share of repeated token
4-grams, the zlib compression ratio, UTF-8 bytes per generator token, EOS not counted (it falls when the
text stops being words the tokenizer knows: invented syllables), the share of groups whose G responses are identical, mean
length over the limit."""


def step_record(rollout, adv: torch.Tensor, reward, cme, group_size: int, times: tuple,
                max_new_tokens: int | None = None) -> dict:
    """What one rank contributes to a step's metrics: raw per-response values.

    rollout: the rank's sampling.Rollout; adv: (B, T) or (B,) advantages; reward: (B,) per-response
    reward; cme: (B,) CME or None (RENT); times: perf_counter at the step's start, after generation,
    after scoring and after the update; max_new_tokens: the length limit (None: not recorded)."""
    t0, t1, t2, t3 = times
    groups = adv.reshape(-1, group_size * (adv.numel() // adv.shape[0]))
    shared = shared_share(rollout, group_size) * max(int(rollout.mask.sum()), 1)
    ids = [rollout.response[b, :int(rollout.mask[b].sum())].tolist() for b in range(len(rollout.texts))]
    words = [t.lower().split() for t in rollout.texts]
    same = [len({tuple(x) for x in ids[g:g + group_size]}) == 1 for g in range(0, len(ids), group_size)]
    return {"reward": np.asarray(reward, dtype=np.float64), "cme": None if cme is None else np.asarray(cme),
            "lengths": rollout.mask.sum(1).numpy(), "truncated": rollout.truncated.numpy(),
            "zero_spread": (groups.abs().sum(1) == 0).numpy(), "shared": shared,
            "distinct_1": np.array([distinct(w, 1) for w in words]),
            "distinct_2": np.array([distinct(w, 2) for w in words]),
            "repeated_4gram": np.array([repeated_share(x, 4) for x in ids]),
            "compression": np.array([compression_ratio(t) for t in rollout.texts]),
            "bytes_per_token": np.array([len(t.encode("utf-8")) / (len(x) - (not cut)) if len(x) > (not cut) else np.nan
                                         for t, x, cut in zip(rollout.texts, ids, rollout.truncated.tolist())]),
            "identical_groups": np.array(same), "limit": max_new_tokens,
            "times": (t1 - t0, t2 - t1, t3 - t2, t3 - t0)}


def _stats(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return (float(x.mean()), float(x.std())) if len(x) else (float("nan"), float("nan"))


def step_metrics(records: list[dict]) -> dict:
    """A step's metrics from every rank's `step_record`, rank 0 first. Times are the slowest rank's."""
    cat = {k: np.concatenate([r[k] for r in records]) for k in ("reward", "lengths", "truncated", "zero_spread")}
    lengths = cat["lengths"]
    t_gen, t_score, t_update, t_step = np.max([r["times"] for r in records], axis=0)
    m = dict(zip(("reward_mean", "reward_std"), _stats(cat["reward"])))
    if records[0]["cme"] is not None:
        m.update(zip(("cme_mean", "cme_std"), _stats(np.concatenate([r["cme"] for r in records]))))
    m.update({"zero_spread_groups": float(cat["zero_spread"].mean()),
              "shared_positions": sum(r["shared"] for r in records) / max(int(lengths.sum()), 1),
              "len_mean": float(lengths.mean()), "len_max": int(lengths.max()),
              "truncated": float(cat["truncated"].mean()), "tokens_per_s": float(lengths.sum() / t_step),
              "time_gen": float(t_gen), "time_score": float(t_score), "time_update": float(t_update),
              "step_time": float(t_step)})
    for k in COLLAPSE_KEYS[:-2]:  # means over the responses they are defined for
        x = np.concatenate([r[k] for r in records]).astype(np.float64)
        m[k] = float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
    m["identical_groups"] = float(np.concatenate([r["identical_groups"] for r in records]).mean())
    if records[0].get("limit"):
        m["len_to_limit"] = float(lengths.mean() / records[0]["limit"])
    return m


class CollapseWatch:
    """Says once, in one line, when a run's rollouts start to collapse, and when its learning stalls.

    The rule compares the mean of the last WINDOW steps with the run's own first WINDOW steps (its
    baseline: every prompt set and model has its own level). Collapse is any of three failures:
      - loops: repeated token 4-grams up by REPEATS_UP (an absolute share);
      - invented words: UTF-8 bytes per generator token (EOS not counted) down to BYTES_RATIO of the
        baseline (text the tokenizer has no words for splits into short pieces);
      - sameness: the share of groups whose G responses are identical up by IDENTICAL_UP.
    Chosen from three 40-step runs of the real small models (docs/real-models.md, "Collapse, as it
    happens"): the laptop run loops (repeats +0.05 at step 32, +0.20 at 40) and its random-verifier
    control invents words (bytes per token at 0.79 of its start at step 28, 0.61 at 34), while the run
    at Appendix E's learning rate stays far inside every bound (repeats +0.010 at most, bytes per token
    0.93 of its start at the lowest). The zlib compression ratio is logged but not watched: it falls with
    length alone (plain English: 1.26 at 31 bytes, 0.63 at 348), so answers that grow would trip it.
    Length does not move the three watched measures: tests/test_train.py replays runs of plain text
    that grow from 60 to 500 bytes and shrink from 60 tokens to 2 without a warning.

    A stall is STALL_STEPS steps in a row in which no group has any reward spread: every advantage is 0,
    the gradient is 0 and the weights do not move (a policy collapsed into one response per prompt).
    """
    WINDOW = 5
    REPEATS_UP = 0.05
    BYTES_RATIO = 0.8
    IDENTICAL_UP = 0.5
    STALL_STEPS = 3

    def __init__(self):
        self.rows: list[dict] = []
        self.fired: int | None = None        # the step the collapse warning was given at
        self.stalled: int | None = None      # the step the stall warning was given at

    def update(self, m: dict) -> str | None:
        """m: a step's metrics line. Returns a warning the first time each rule holds, else None."""
        self.rows.append(m)
        return self._stall(m) or self._collapse(m)

    def _stall(self, m: dict) -> str | None:
        n = self.STALL_STEPS
        if self.stalled is not None or len(self.rows) < n:
            return None
        if all(r.get("zero_spread_groups") == 1.0 for r in self.rows[-n:]):
            self.stalled = m["step"]
            return (f"warning: no group has had any reward spread for {n} steps (step {m['step']}): every "
                    "advantage is 0 and the weights no longer change; the rollouts have collapsed (see "
                    "samples.jsonl); consider a lower --lr or --beta > 0")
        return None

    def _collapse(self, m: dict) -> str | None:
        w = self.WINDOW
        if self.fired is not None or len(self.rows) < 2 * w:
            return None
        def mean(key, rows):  # over the steps that have the measure (older logs lack bytes_per_token)
            x = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
            return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")
        base, now = self.rows[:w], self.rows[-w:]
        repeats = (mean("repeated_4gram", base), mean("repeated_4gram", now))
        piece = (mean("bytes_per_token", base), mean("bytes_per_token", now))
        same = (mean("identical_groups", base), mean("identical_groups", now))
        kind = ("repetition" if repeats[1] - repeats[0] >= self.REPEATS_UP else
                "invented words" if piece[1] <= self.BYTES_RATIO * piece[0] else
                "identical responses" if same[1] - same[0] >= self.IDENTICAL_UP else None)
        if kind is None:
            return None
        self.fired = m["step"]
        return (f"warning: the rollouts are collapsing into {kind} at step {m['step']}: over the last {w} steps "
                f"repeated 4-grams {repeats[1]:.0%} (first {w} steps: {repeats[0]:.0%}), bytes per token "
                f"{piece[1]:.2f} ({piece[0]:.2f}), identical groups {same[1]:.0%} ({same[0]:.0%}); see curves.png, "
                "and consider a lower --lr or --beta > 0")


# --- the metrics file: JSON lines, NaN written as null ----------------------------------------------------

def metrics_line(m: dict) -> str:
    """One step's metrics as a strict JSON line: NaN and infinities (a distinct-2 of one-word answers)
    become null, which every JSON reader accepts (jq and JavaScript reject NaN)."""
    def clean(v):
        return None if isinstance(v, float) and not np.isfinite(v) else v
    return json.dumps({k: clean(v) for k, v in m.items()}, allow_nan=False)


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl, null read back as NaN (and NaN of older files as it was); a line
    cut off by a kill is left out."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({k: float("nan") if v is None else v for k, v in row.items()})
    return rows


def log_samples(path: Path, step: int, rollout, token_rewards, gen_tokenizer, k: int) -> list[dict]:
    """Append k responses to `path` with each generator token's verifier surprise -r_t (None where masked).

    token_rewards: (B, T) Eq. 1 rewards of the rollout, or None (then surprise is None)."""
    out = []
    for b in range(min(k, len(rollout.texts))):
        n = int(rollout.mask[b].sum())
        ids = rollout.response[b, :n].numpy()
        pieces = [decode_response(token_bytes(gen_tokenizer, [i])).text for i in ids]
        surprise = None
        if token_rewards is not None:
            surprise = [round(-float(token_rewards[b, t]), 3) if token_rewards[b, t] != 0 else None for t in range(n)]
        out.append({"step": step, "prompt": rollout.prompts[b], "response": rollout.texts[b],
                    "tokens": pieces, "surprise": surprise})
    with open(path, "a", encoding="utf-8") as f:
        for s in out:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return out


def machine(device: str = "cpu") -> str:
    """What a measurement ran on, for its report: the GPU's name for a cuda `device`, else the CPU's model
    name and torch's thread count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    n = torch.get_num_threads()
    return f"{cpu}, {n} thread{'s' if n != 1 else ''}"


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Training curves from metrics.jsonl to a PNG (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    keys = [("reward_mean", "reward (mean r)"), ("cme_mean", "verifier CME"), ("len_mean", "response length"),
            ("grad_norm", "grad norm"), ("distinct_1", "distinct-1 (words)"), ("distinct_2", "distinct-2 (words)"),
            ("repeated_4gram", "repeated token 4-grams"), ("compression", "zlib compression ratio"),
            ("bytes_per_token", "bytes per token"),
            ("identical_groups", "groups of identical responses"), ("len_to_limit", "length / limit")]
    keys = [(k, t) for k, t in keys if any(r.get(k) is not None for r in rows)]
    ncols = min(len(keys), 5)
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, (k, title) in zip(axes.flat, keys):
        ax.plot([r["step"] for r in rows], [r.get(k) for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
