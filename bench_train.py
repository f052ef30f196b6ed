"""Where a CME-GRPO step spends its time: generate, score, update, side by side in one run.

    python bench_train.py                          # CPU: tiny models built in a temp folder (what CI can run)
    python bench_train.py --device cuda --paper    # the paper's sizes: random-init Qwen2.5-0.5B generator and
                                                   # gemma-3-1b verifier (published configs), 16 prompts x 8 x
                                                   # 2,048 new tokens (Appendix E), verifier in bf16
    python bench_train.py --gen DIR --verifier DIR --prompts-per-step 4 --max-new-tokens 64
    torchrun --nproc_per_node 2 bench_train.py     # the same step on 2 ranks (train.py's data parallelism)
    python bench_train.py --lora-rank 16           # full fine-tuning and LoRA side by side, memory included

It runs train.py's own loop (`train.train`) on synthetic prompts for --warmup + --steps optimizer steps
and prints, over the measured steps, each phase's seconds per step and share, response tokens per second
(the step's generated tokens over the phase's seconds), and the peak memory: allocated GPU memory on a
GPU, the process's peak resident memory on a CPU. Random-init models rarely emit EOS, so their responses
run to --max-new-tokens: the worst case of a real run's generation. Rollout flags (--cache,
--compile-decode, --rollout-dtype) pass through to train.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent / "shared"

# Published configs (Hugging Face model cards' config.json), random weights: the speed of the real shapes.
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
GEMMA3_1B = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                 num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                 query_pre_attn_scalar=256, max_position_embeddings=32768, sliding_window=512, rope_theta=1e6,
                 rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh")
TOPICS = ["the water cycle", "binary search", "photosynthesis", "the French revolution", "how vaccines work",
          "compound interest", "black holes", "the rules of chess", "making bread", "machine translation",
          "plate tectonics", "the immune system", "sorting algorithms", "the stock market", "climate change",
          "how airplanes fly", "the printing press", "DNA replication", "jazz music", "electric cars"]


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A tiny Qwen2 generator (byte-level BPE, ChatML) and Gemma3 verifier (SentencePiece-style), as the tests use."""
    from tiny import build_bytebpe, build_model, build_sentencepiece
    corpus = [f"Explain {t} in a few sentences. It is about {t}, and more." for t in TOPICS] * 10
    gen = build_model(folder / "gen", build_bytebpe(folder / "gen_tok", corpus), "qwen2")
    ver = build_model(folder / "ver", build_sentencepiece(folder / "ver_tok", corpus, gemma=True), "gemma3")
    return gen, ver


def paper_models(folder: Path) -> tuple[Path, Path]:
    """Random-init models with the published Qwen2.5-0.5B and gemma-3-1b configs and the real tokenizers
    (../shared/tokenizers, or the hub)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = []
    for name, spec, local, hub in (("gen", QWEN25_05B, "qwen2.5", "Qwen/Qwen2.5-0.5B"),
                                   ("ver", GEMMA3_1B, "gemma-3", "google/gemma-3-1b-it")):
        tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / local if (SHARED / "tokenizers" / local).is_dir()
                                            else hub)
        spec = dict(spec)
        config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        out.append(folder / name)
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen", help="generator: hub id or folder (default: a tiny model, or --paper's)")
    ap.add_argument("--verifier", help="verifier: hub id or folder (default: a tiny model, or --paper's)")
    ap.add_argument("--paper", action="store_true", help="random-init models at the paper's sizes and settings, "
                    "16 prompts x 8 x 2,048 new tokens (random weights rarely stop early: a real step's worst case)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    ap.add_argument("--prompts-per-step", type=int, help="prompts per step (default: 4, or 16 with --paper)")
    ap.add_argument("--group-size", type=int, default=8, help="G (default: 8)")
    ap.add_argument("--max-new-tokens", type=int, help="response length limit (default: 32, or 2,048 with --paper)")
    ap.add_argument("--micro-batch", type=int, default=4, help="responses per update micro-batch (default: 4)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps (default: 2)")
    ap.add_argument("--warmup", type=int, default=1, help="steps run first and not measured (default: 1)")
    ap.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="rollout KV cache (default: dynamic)")
    ap.add_argument("--compile-decode", action="store_true", help="compile the decode step (with --cache static, GPU)")
    ap.add_argument("--rollout-dtype", default="fp32", choices=["fp32", "bf16"], help="rollout weights (default: fp32)")
    ap.add_argument("--lora-rank", type=int, default=0, help="also run the step with LoRA adapters of this rank, in a "
                    "fresh process each, and print the two side by side (default: 0, full fine-tuning only)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one run's result, for --lora-rank
    args = ap.parse_args(argv)
    if args.lora_rank and not args.json:
        return side_by_side(argv, args.lora_rank)
    pps = args.prompts_per_step or (16 if args.paper else 4)
    new = args.max_new_tokens or (2048 if args.paper else 32)
    for name, value in (("--prompts-per-step", pps), ("--max-new-tokens", new), ("--steps", args.steps),
                        ("--group-size", args.group_size - 1), ("--micro-batch", args.micro_batch),
                        ("--warmup", args.warmup + 1)):
        if value < 1:
            print(f"error: {name} is too small", file=sys.stderr)
            return 2

    import torch

    import train as T
    from distributed import rank_device

    rank0 = int(os.environ.get("RANK", "0")) == 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            if args.gen and args.verifier:
                gen, ver = args.gen, args.verifier
            else:
                gen, ver = paper_models(tmp) if args.paper else tiny_models(tmp)
        except OSError as e:
            print(f"error: cannot build the benchmark models ({str(e).splitlines()[0]})", file=sys.stderr)
            return 2
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"instruction": f"Explain {t} to a curious {who}."}) + "\n"
                                   for who in ("child", "student", "engineer", "friend") for t in TOPICS))
        cfg = T.Config(gen=str(gen), verifier=str(ver), prompts=str(prompts), out=str(tmp / "run"),
                       prompts_per_step=pps, group_size=args.group_size, max_new_tokens=new,
                       micro_batch=args.micro_batch, gen_batch=pps * args.group_size, device=args.device,
                       max_steps=args.warmup + args.steps, sample_every=0, save_every=10 ** 6, lr=1e-6,
                       warmup_steps=1, cache=args.cache, compile_decode=args.compile_decode,
                       rollout_dtype=args.rollout_dtype, lora_rank=args.lora_rank)
        try:
            history = T.train(cfg)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not rank0:
        return 0
    measured = history[args.warmup:]
    mean = {k: sum(m[k] for m in measured) / len(measured)
            for k in ("time_gen", "time_score", "time_update", "step_time", "len_mean")}
    if args.json:
        gpu = torch.cuda.is_available() and rank_device(cfg.device).type == "cuda"
        mean["peak_gb"] = (max(m["peak_mem_gb"] for m in measured) if gpu else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
        mean["memory"] = "peak GPU memory allocated" if gpu else "peak resident memory of the process"
        print("RESULT " + json.dumps(mean))
        return 0
    tokens = mean["len_mean"] * pps * args.group_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"\nCME-GRPO step: {pps} prompts x G = {args.group_size}, up to {new} new tokens, {world} rank(s), "
          f"device {rank_device(cfg.device).type}, cache {args.cache}, rollouts {args.rollout_dtype}")
    print(f"generator {gen}\nverifier  {ver}\nmean over {len(measured)} steps after {args.warmup} warm-up; "
          f"{tokens:.0f} response tokens per step\n")
    print(f"{'phase':<10}{'s/step':>10}{'share':>9}{'tokens/s':>12}")
    for label, key in (("generate", "time_gen"), ("score", "time_score"), ("update", "time_update"),
                       ("step", "step_time")):
        print(f"{label:<10}{mean[key]:>10.2f}{100 * mean[key] / mean['step_time']:>8.1f}%{tokens / mean[key]:>12.0f}")
    if torch.cuda.is_available() and rank_device(cfg.device).type == "cuda":
        print(f"\npeak GPU memory allocated: {max(m['peak_mem_gb'] for m in measured):.2f} GiB")
    else:
        print(f"\npeak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


def side_by_side(argv: list[str] | None, rank: int) -> int:
    """The same benchmark, full fine-tuning and LoRA of `rank`, each in a fresh process (a process's peak
    memory only grows), printed side by side."""
    import subprocess

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--lora-rank" in argv:
        i = argv.index("--lora-rank")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--lora-rank=")]
    results = {}
    for label, r in (("full", 0), (f"LoRA r={rank}", rank)):
        done = subprocess.run([sys.executable, __file__, *argv, "--lora-rank", str(r), "--json"],
                              capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"error: the {label} run failed",
                  file=sys.stderr)
            return 2
        results[label] = json.loads(line[0][len("RESULT "):])
    print(f"\n{'':<22}" + "".join(f"{k:>14}" for k in results))
    for label, key in (("generate s/step", "time_gen"), ("score s/step", "time_score"),
                       ("update s/step", "time_update"), ("step s", "step_time")):
        print(f"{label:<22}" + "".join(f"{r[key]:>14.2f}" for r in results.values()))
    memory = next(iter(results.values()))["memory"]
    print(f"{'memory GiB':<22}" + "".join(f"{r['peak_gb']:>14.2f}" for r in results.values()) + f"   ({memory})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
