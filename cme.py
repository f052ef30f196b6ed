"""CME of finished outputs: the mean sequence-level CME (Eq. 3) of a model's outputs under a
verifier, and the per-token surprise heatmaps of Figure 1.

    python evaluate.py cme outputs/*.jsonl --verifier google/gemma-3-1b-it --heatmap 0 [--heatmap-format png]

A diagnostic, not a judge: a lower CME says the verifier finds the outputs less surprising, which the
paper's premise reads as better, and which a run that loops one phrase also achieves.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from records import read_outputs
from reward import Verifier, encode_pair, load_causal_lm

def token_surprise(verifier, instruction: str, output: str) -> tuple[list[str], np.ndarray]:
    """The response's verifier tokens as text pieces and their surprise -log p (nats): (S,) float64.

    A character split across tokens (byte-fallback pieces of an emoji, say) is shown with the token
    that holds its first byte, so the pieces join to the response exactly; the others show as "".
    """
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
