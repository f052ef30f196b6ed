"""Keeping a run: atomic checkpoints, exact resume and its refusals, logs cut back to the checkpoint.

    save_checkpoint(out, "checkpoint-50", model, tok, shipped, optimizer, scheduler, 50, asdict(cfg), ...)
    path, state = intact_checkpoint(out)      # the newest checkpoint that loads; broken ones are named
    check_resume(cfg, state, prompts, may_change=RESUME_MAY_CHANGE)

What a checkpoint guarantees:
  1. It is whole or absent: written to a temporary folder and renamed. A failed write (a full disk)
     removes the temporary folder and is one OSError naming the checkpoint before it, which is intact.
  2. It loads with `AutoModelForCausalLM.from_pretrained` (weights, tokenizer, the checkpoint's own
     sampling defaults), and `training_state.pt` holds what exact resume needs: optimizer, schedule,
     every rank's RNG state, the step, the config and a fingerprint of the prompts.
  3. A resume continues exactly, or refuses in one line: any setting that changes what is computed, a
     changed prompt file, another number of ranks. Logs written after the checkpoint are cut back.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

# --- writing: a full disk is one line --------------------------------------------------------------------

def is_write_error(e: BaseException) -> bool:
    """Whether `e` is what a failed write raises: OSError (files, matplotlib), RuntimeError (torch.save),
    the safetensors writer's own error, and the plain Exception that Rust writers (the tokenizers
    library's `save`) raise with the OS's words: "No space left on device (os error 28)"."""
    from safetensors import SafetensorError
    return isinstance(e, (OSError, RuntimeError, SafetensorError)) or (
        type(e) is Exception and "(os error " in str(e))


@contextmanager
def writing(what: str, out: Path, remove: Path | None = None):
    """Turn a failed write inside the block into one OSError line: what could not be written, why, and
    the newest checkpoint in `out`, which a failed write never touches. `remove`: a temporary folder
    deleted first."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (narrowed at once: only a failed write becomes the line)
        if not is_write_error(e):
            raise
        left = free_space(out)  # before the cleanup frees what the failed write took
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        previous = latest_checkpoint(out)
        raise OSError(f"cannot write {what}: {reason} ({left} left on its disk); "
                      + (f"{previous} is intact" if previous else "no checkpoint was written before")) from None


def free_space(folder: Path) -> str:
    """The space left on the filesystem holding `folder` (or its nearest existing parent), for people."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    return next(f"{free / 1024 ** k:.0f} {u}" for k, u in ((3, "GB"), (2, "MB"), (1, "KB"), (0, "bytes"))
                if free >= 1024 ** k or k == 0)


# --- RNG state -----------------------------------------------------------------------------------------

def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states: Python, numpy, torch, and the CUDA generator of `device` (the GPU this
    rank samples on) alone, as tensors and tuples that torch.load(weights_only=True) reads back. Only
    that GPU's: a resume under another CUDA_VISIBLE_DEVICES layout then gives each rank its own stream."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()),
                                                  *np_state[2:]),
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what `rng_state` returned; its CUDA state goes to `device` (checkpoints before this held
    every visible GPU's, a list: the entry of `device`'s ordinal is used)."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


# --- checkpoints ---------------------------------------------------------------------------------------

def save_checkpoint(out: Path, name: str, model, tokenizer, generation_config, optimizer, scheduler,
                    step: int, config: dict, prompts_digest: str | None = None, rng: list | None = None) -> Path:
    """Write a checkpoint to a temporary folder and rename it: a crash never leaves half a checkpoint.

    A failed write (a full disk) removes the temporary folder and raises OSError in one line naming
    the part that failed (`writing`); the checkpoints already on disk are untouched. config: the run's settings (checked on resume).
    prompts_digest: `prompts_sha` of the run's prompts. rng: every rank's RNG state, rank 0 first
    (default: this process's alone).
    """
    final, tmp = out / name, out / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model_gen_config = model.generation_config
    model.generation_config = generation_config  # ship the checkpoint's own sampling defaults
    try:
        with writing(f"{final} (model weights)", out, remove=tmp):
            model.save_pretrained(tmp, safe_serialization=True)
        with writing(f"{final} (tokenizer)", out, remove=tmp):
            tokenizer.save_pretrained(tmp)
        with writing(f"{final} (training state)", out, remove=tmp):
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng or [rng_state()], "world_size": len(rng or [0]), "step": step, "config": config,
                        "prompts_sha256": prompts_digest}, tmp / "training_state.pt")
    finally:
        model.generation_config = model_gen_config
    old = out / f".old-{name}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoint-N folders in out, oldest first."""
    return sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1][1] if found else None


def recover_checkpoints(out: Path) -> None:
    """Undo what a crash inside `save_checkpoint`'s overwrite of checkpoint-N leaves: between its two
    renames only `.old-checkpoint-N`, the intact previous version, exists; it becomes checkpoint-N
    again. After the second rename the leftover `.old-` folder is removed."""
    for old in out.glob(".old-checkpoint-*"):
        final = out / old.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


def intact_checkpoint(out: Path, verbose: bool = True) -> tuple[Path, dict]:
    """The newest checkpoint in `out` that loads, and its training state. A broken one (a truncated or
    empty training_state.pt, missing weights) is named on stderr (when verbose) and the one before it
    is tried. A checkpoint that a crash left half-replaced is restored first (`recover_checkpoints`)."""
    recover_checkpoints(out)
    found = checkpoints(out)
    if not found:
        raise ValueError(f"--resume: no checkpoint in {out}")
    broken = []
    for _, path in reversed(found):
        try:
            return path, read_state(path)
        except ValueError as e:
            if verbose:
                print(f"warning: {path} is broken ({str(e)[:120]}); trying the checkpoint before it", file=sys.stderr)
            broken.append(path.name)
    raise ValueError(f"--resume: no intact checkpoint in {out} (broken: {', '.join(broken)})")


def read_state(path: Path) -> dict:
    """The training state of the checkpoint folder `path`, or one ValueError line saying what is wrong."""
    try:
        full = (path / "config.json").is_file() and any(path.glob("model*.safetensors"))
        adapter = (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
        if not (full or adapter):  # a full model, or a LoRA adapter (lora.py)
            raise ValueError("no model weights")
        state = torch.load(path / "training_state.pt", weights_only=True)
        if not {"optimizer", "scheduler", "rng", "step", "config"} <= state.keys():
            raise ValueError("training_state.pt lacks fields")
    except Exception as e:  # noqa: BLE001  (a damaged file fails in many ways: pickle, zip, EOF, OS)
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return state


def weights_digest(model) -> str:
    """SHA-256 of a model's parameters, in order: equal on every rank that loaded the same weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prune_checkpoints(out: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoint folders (all of them when keep is 0)."""
    found = checkpoints(out)
    for _, p in found[:-keep] if keep > 0 else found:
        shutil.rmtree(p)


# --- resume --------------------------------------------------------------------------------------------

def prompts_sha(prompts: list[str]) -> str:
    """Fingerprint of the run's prompts, in training order."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_resume(cfg, state: dict, prompts: list[str], may_change: set[str]) -> None:
    """Refuse, naming it, any setting that differs from the checkpoint's and changes what is computed
    (model, verifier, reward, data, optimizer, schedule), and prompts whose content changed.

    cfg: the run's config, a dataclass whose fields are its --flags (and has `prompts`); state: the
    checkpoint's training state; may_change: the fields a resumed run may set anew (where and how fast
    it runs, what it records, how far it goes)."""
    saved = state["config"]
    for f in fields(cfg):
        if f.name in may_change:
            continue
        was = saved.get(f.name, f.default)  # older checkpoints: the default
        if was != getattr(cfg, f.name):
            raise ValueError(f"--resume: --{f.name.replace('_', '-')} was {was!r} in the checkpoint, now "
                             f"{getattr(cfg, f.name)!r}; resume with the same value, or start a new --out")
    sha = state.get("prompts_sha256")
    if sha is not None and sha != prompts_sha(prompts):
        raise ValueError(f"--resume: the prompts from {cfg.prompts} are not the ones the checkpoint trained on "
                         "(the file or dataset changed); restore them, or start a new --out")


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of steps <= step (a resume after a kill would otherwise repeat steps)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut off by the kill
    tmp = path.with_suffix(".tmp")
    with writing(str(path), path.parent):
        try:
            tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        except BaseException:
            tmp.unlink(missing_ok=True)  # the log itself is untouched
            raise
    tmp.replace(path)
