"""Where prompts come from: files, hub datasets (UltraFeedback for training, Section 3 and Appendix
E), and AlpacaEval's 805 evaluation instructions (Section 3).

    read_prompts("prompts.jsonl", field="instruction")          # a local file, in file order
    read_prompts("openbmb/UltraFeedback", field="instruction")  # a hub dataset (its "train" split)
    load_eval_prompts("alpaca_eval")                            # [{index, instruction}], from the hub

Prompts are only read here; choosing the run's subset and order is the trainer's (train.load_prompts).
A file that cannot be read is one line naming it and, where it has one, the line.
"""
from __future__ import annotations

import json
from pathlib import Path

from records import one_line, read_json_list, read_jsonl

ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval.json"
PROMPT_FILE_SUFFIXES = (".jsonl", ".json", ".txt")


def read_prompt_file(path: Path, key: str) -> list[str]:
    """The prompts of a .txt (one per line), .jsonl (a string or an object per line) or .json (a list of
    them) file; `key` names the prompt in objects."""
    def pick(obj, where):
        if isinstance(obj, str):
            return obj
        if isinstance(obj, dict) and isinstance(obj.get(key), str):
            return obj[key]
        raise ValueError(f"{where}: expected a string or an object with a string {key!r} field")

    if path.suffix not in PROMPT_FILE_SUFFIXES:
        raise ValueError(f"{path}: prompt files must end in .jsonl, .json or .txt")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?)") from None
    if path.suffix == ".txt":
        return text.splitlines()
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(pick(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return out
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts")
    return [pick(x, f"{path}: item {i}") for i, x in enumerate(data)]


def read_prompts(source: str, field: str = "instruction", split: str = "train") -> list:
    """Every prompt of a source, in its order (empty and repeated ones included).

    source: a local .jsonl / .json / .txt file (`read_prompt_file`), or a hub dataset id or a dataset
    folder (`datasets.load_dataset(source, split=split)[field]`).
    """
    path = Path(source)
    if not path.is_dir() and (path.suffix in PROMPT_FILE_SUFFIXES or path.exists()):
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        return read_prompt_file(path, field)
    import datasets
    try:
        return datasets.load_dataset(source, split=split)[field]
    except Exception as e:  # noqa: BLE001  (hub and dataset errors come in many types)
        raise ValueError(f"cannot load prompts from dataset {source!r} split {split!r}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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
                             f"hub ({one_line(e)}); pass a local file with --prompts") from None
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
