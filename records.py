"""Records on disk: JSON Lines files read with file:line errors and appended so that an interrupted
run loses nothing it wrote, and the outputs files that evaluation generates and judges.

    rows = read_jsonl("outputs/cme.jsonl", partial_tail_ok=True)   # a killed run's cut-off line skipped
    with open_for_append(path) as f:                               # cuts such a line off first
        write_record(f, {"index": 0, "output": "..."})             # flushed: a kill loses nothing written

Every reader turns what is wrong with a file into one line that names it (and the line, where it has
one): a missing file, a binary one, a broken .gz, a malformed line, a record without its fields.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def one_line(e: BaseException | str) -> str:
    """The first line of an error or message (the exception's type when it says nothing)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- JSON Lines ----------------------------------------------------------------------------------------

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
        raise ValueError(f"{path}: cannot read it as UTF-8 JSON lines ({one_line(e)[:80]})") from None
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


def read_json(path: str | Path):
    """What a .json file holds, with the file and line of a syntax error in one line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?)") from None


def read_json_list(path: Path) -> list:
    """The list held by a .json file (AlpacaEval's format), with the file and line of a syntax error."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return rows


# --- outputs files -------------------------------------------------------------------------------------

def read_outputs(path: str | Path) -> dict[int, dict]:
    """A model's outputs file (what `evaluate.py generate` writes; AlpacaEval's .json lists work too)
    as index -> record.

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
    out, first = {}, {}
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("index"), int) or not isinstance(r.get("instruction"), str) \
                or not isinstance(r.get("output"), str):
            raise ValueError(f"{path}: record {n} needs an integer 'index' and string 'instruction' and 'output'")
        if r["index"] in first:
            raise ValueError(f"{path}: record {n} repeats index {r['index']} of record {first[r['index']]}; "
                             "an outputs file holds one output per prompt")
        first[r["index"]] = n
        out[r["index"]] = {"index": r["index"], "instruction": r["instruction"], "output": r["output"],
                           "generator": str(r.get("generator") or name)}
    if not out:
        raise ValueError(f"{path}: no outputs")
    return out


# --- generated blocks of the docs ------------------------------------------------------------------------

def write_block(page: str | Path, label: str, name: str, text: str) -> None:
    """Put `text` between the lines `<!-- {label}: {name} -->` and the next `<!-- /{label} -->` of the
    page at `page` (a docs table rebuilt from the files it is a function of). One line if there is no
    such marker."""
    path = Path(page)
    doc = path.read_text()
    start, end = f"<!-- {label}: {name} -->\n", f"<!-- /{label} -->"
    if start not in doc or end not in doc[doc.index(start):]:
        raise ValueError(f"{path} has no '{start.strip()}' ... '{end}' block")
    a = doc.index(start) + len(start)
    path.write_text(doc[:a] + text + doc[doc.index(end, a):])
