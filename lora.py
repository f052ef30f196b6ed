"""A generator bigger than the GPU's full-fine-tuning budget: LoRA adapters through peft (optional).

    python train.py --gen meta-llama/Llama-3.1-8B --lora-rank 16 ...      # only the adapters train
    python lora.py merge runs/cme-grpo/checkpoint-N OUT                    # a model from_pretrained loads

With `--lora-rank R` the generator's frozen weights are loaded in bf16 on a GPU (fp32 on a CPU): no
fp32 master copy and no optimizer state for them; the adapters (rank R, `--lora-alpha`,
`--lora-dropout`, on `--lora-target-modules`) are fp32 and are all the optimizer sees. With `--beta > 0`
the KL reference is the same model with its adapters disabled, so no second copy is loaded.
Checkpoints hold the adapter (`adapter_model.safetensors`, `adapter_config.json`) with the tokenizer and
the training state; `--resume` loads the base weights from `--gen` and the adapter from the checkpoint.
`merge` folds an adapter into its base weights and writes a full model.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

__all__ = ["require", "add_adapters", "load_adapters", "reference", "is_adapter", "merge"]


def require() -> None:
    """One line, before any work, when peft is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError("--lora-rank needs the peft package: pip install peft") from None


def add_adapters(model, rank: int, alpha: float, dropout: float, targets: str):
    """model with fresh LoRA adapters (B = 0, so it computes exactly what it did), the rest frozen.

    rank: R; alpha: the scale is alpha / R; dropout: on the adapters' input; targets: comma-separated
    module names ("q_proj,v_proj"), or "all-linear" for every linear layer but the output layer.
    Returns a peft PeftModel, whose only trainable parameters are the adapters (fp32)."""
    from peft import LoraConfig, get_peft_model

    names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft's words when no module matches
        raise ValueError(f"--lora-target-modules {targets}: {str(e).splitlines()[0]}") from None


def load_adapters(model, path: Path):
    """model with the trainable adapter of a checkpoint folder loaded onto it (resume)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=True)


def is_adapter(path: Path) -> bool:
    """Whether a checkpoint folder holds a LoRA adapter rather than a full model."""
    return (Path(path) / "adapter_config.json").is_file()


@contextmanager
def reference(model, ref_model):
    """The KL reference's context: with ref_model the policy itself (LoRA), its adapters disabled; a
    separate reference model needs nothing."""
    with (model.disable_adapter() if ref_model is model else nullcontext()):
        yield


def merge(checkpoint: Path, out: Path, base: str | None = None) -> Path:
    """Fold a checkpoint's adapter into its base weights and save a full model with the tokenizer.

    checkpoint: a folder with adapter_config.json; base: the base model (default: the one the adapter
    names, which is train.py's --gen). Returns out, which AutoModelForCausalLM.from_pretrained loads."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint}: no such checkpoint folder")
    if not is_adapter(checkpoint):
        raise ValueError(f"{checkpoint} holds no LoRA adapter (adapter_config.json); it is already a full model")
    try:
        base = base or json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{checkpoint / 'adapter_config.json'} is corrupt ({type(e).__name__}: {e})") from None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold a checkpoint's adapter into its base model and save the full model")
    m.add_argument("checkpoint", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--base", default=None, help="the base model (default: the one named in adapter_config.json)")
    args = ap.parse_args(argv)
    try:
        require()
        print(f"saved {merge(args.checkpoint, args.out, args.base)} (load it with AutoModelForCausalLM.from_pretrained)")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
