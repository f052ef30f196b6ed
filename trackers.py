"""Watching a run live: the metrics line, the run's config and sample responses sent to a tracker.

    tracker = open_tracker("tensorboard", out, config)   # rank 0 only; "none" gives one that does nothing
    tracker.log(metrics, step)                           # every step: each number of the metrics line
    tracker.log_samples(rows, step)                      # every --sample-every steps: a table
    tracker.close()

Trackers are optional dependencies, imported only when asked for: tensorboard (event files under
OUT/tensorboard, read with `tensorboard --logdir OUT/tensorboard`), wandb (WANDB_MODE=offline writes
under OUT/wandb with no network; `wandb sync` uploads later) and trackio (a local SQLite database,
`trackio show`). A tracker that fails mid-run costs the run nothing: one warning, and the run goes on
without it. metrics.jsonl stays the record of the run either way.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

__all__ = ["TRACKERS", "open_tracker", "Tracker"]

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
"""--report-to name -> the package it needs (pip install NAME)."""

PROJECT = "cme-grpo"


def say(line: str) -> None:
    """One line on stderr, on its own line even under the run's progress bar."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)


class Tracker:
    """Sends a run's records to one tracker (`kind`), or nowhere (kind "none").

    Every call is guarded: the first exception the tracker raises prints one warning naming it and the
    step, and the tracker is off for the rest of the run."""

    def __init__(self, kind: str = "none", backend=None):
        self.kind, self.backend, self.failed = kind, backend, False

    def _call(self, step: int | None, method: str, *args) -> None:
        if self.backend is None or self.failed:
            return
        try:
            getattr(self.backend, method)(*args)
        except Exception as e:  # any error of the tracker's own: the run must go on
            self.failed = True
            where = f" at step {step}" if step is not None else ""
            say(f"warning: --report-to {self.kind} failed{where} ({type(e).__name__}: {e}); the run goes on "
                "without it (metrics.jsonl has every step)")

    def log(self, metrics: dict, step: int) -> None:
        """metrics: the step's metrics line; its finite numbers are logged as scalars at `step`."""
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        self._call(step, "log", numbers, step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        """rows: dicts with the same keys (prompt, response, reward, ...), logged as one table at `step`."""
        if rows:
            self._call(step, "table", rows, step)

    def close(self) -> None:
        self._call(None, "close")


def require(kind: str) -> None:
    """Refuse an unknown tracker, or one whose package is not installed, with one line saying what to do."""
    if kind == "none":
        return
    if kind not in TRACKERS:
        raise ValueError(f"--report-to {kind}: unknown tracker; choose none, {', '.join(TRACKERS)}")
    try:
        __import__(TRACKERS[kind])
    except ImportError:
        raise ValueError(f"--report-to {kind} needs the {TRACKERS[kind]} package: pip install {TRACKERS[kind]}") from None


def open_tracker(kind: str, out: Path, config: dict, name: str | None = None) -> Tracker:
    """A Tracker for `kind` (none | tensorboard | wandb | trackio), its run named `name` (default: the
    out folder's name) with `config` (the run's settings) recorded."""
    require(kind)
    if kind == "none":
        return Tracker()
    name = name or Path(out).name
    try:
        backend = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}[kind](Path(out), config, name)
    except Exception as e:  # a tracker that cannot start (no network, no login) must not stop the run
        say(f"warning: --report-to {kind} could not start ({type(e).__name__}: {e}); the run goes on without it")
        return Tracker()
    return Tracker(kind, backend)


class TensorBoard:
    """Scalars and text in event files under OUT/tensorboard (torch's SummaryWriter)."""

    def __init__(self, out: Path, config: dict, name: str):
        import json

        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, ensure_ascii=False) + "\n```", 0)

    def log(self, numbers: dict, step: int) -> None:
        for k, v in numbers.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, rows: list[dict], step: int) -> None:
        cols = list(rows[0])
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731  (a markdown cell)
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A wandb run in OUT/wandb; WANDB_MODE=offline for no network."""

    def __init__(self, out: Path, config: dict, name: str):
        import wandb
        out.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=PROJECT, name=name, dir=str(out), config=config)

    def log(self, numbers: dict, step: int) -> None:
        self.run.log(numbers, step=step)

    def table(self, rows: list[dict], step: int) -> None:
        cols = list(rows[0])
        self.run.log({"samples": self.wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run in its local database (TRACKIO_DIR, default ~/.cache/huggingface/trackio)."""

    def __init__(self, out: Path, config: dict, name: str):
        import trackio
        self.trackio = trackio
        trackio.init(project=PROJECT, name=name, config=config)

    def log(self, numbers: dict, step: int) -> None:
        self.trackio.log(numbers, step=step)

    def table(self, rows: list[dict], step: int) -> None:
        cols = list(rows[0])
        self.trackio.log({"samples": self.trackio.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])},
                         step=step)

    def close(self) -> None:
        self.trackio.finish()
