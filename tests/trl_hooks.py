"""Test launcher for tests/test_trl.py: one CMEGRPOTrainer step under torchrun, 2 processes, each keeping
the batch it trains on (its completions and their advantages) in OUT/rank{r}.pt.

    torchrun --nproc_per_node 2 tests/trl_hooks.py GEN_MODEL GEN_TOKENIZER VERIFIER OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trl_cme  # noqa: E402
from reward import Verifier, load_causal_lm  # noqa: E402


class Keeping(trl_cme.CMEGRPOTrainer):
    """CMEGRPOTrainer that saves what it trains on."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mask = out["completion_mask"].bool()
        torch.save({"prompts": [x["prompt"] for x in inputs], "advantages": out["advantages"].cpu(),
                    "ids": [row[m].tolist() for row, m in zip(out["completion_ids"], mask)]},
                   self.keep / f"rank{self.accelerator.process_index}.pt")
        return out


def main(gen: str, gen_tokenizer: str, verifier: str, out: str) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    Path(out).mkdir(parents=True, exist_ok=True)
    args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=2,
                      num_generations=4, max_completion_length=12, max_steps=1, save_strategy="no", seed=0,
                      loss_type="grpo", disable_tqdm=True)
    judge = Verifier(*load_causal_lm(verifier, dtype=torch.float32, device="cpu"), token_budget=4096)
    trainer = Keeping(gen, judge, args=args, processing_class=AutoTokenizer.from_pretrained(gen_tokenizer),
                      train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "Say hello."}]}]))
    trainer.keep = Path(out)
    trainer.train()


if __name__ == "__main__":
    main(*sys.argv[1:])
