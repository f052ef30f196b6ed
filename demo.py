"""The offline toy world of `python train.py --demo`: CME-GRPO in miniature, nothing downloaded.

    python train.py --demo            # about 3 minutes on 2 CPU cores
    python train.py --demo --seed 1   # another world

1. A small synthetic language ("Tell me about the cat." -> "the cat sees a tree today. ...").
2. A tiny *verifier* (Gemma3 architecture, SentencePiece-style BPE with byte fallback) is trained on it
   for a few seconds: it now finds the language unsurprising.
3. A tiny *generator* of another family (Qwen2 architecture, byte-level BPE: the two tokenizers
   differ, so Eq. 1's character alignment is really exercised) is pre-trained on the same words in
   scrambled order: it knows the vocabulary, not the grammar (a "base model").
4. CME-GRPO (token-level reward, Eq. 1) trains the generator with the real `train.train`; then the
   same run with `--verifier-init random`, Section 4's control.
5. Before/after table: mean CME (Eq. 3) of the generator's samples on held-out prompts, always under
   the *trained* verifier. The claim in miniature: CME falls by a clear margin with the trained
   verifier, far less with the random one. Both runs' curves go to demo.png.

The builders below (tokenizers trained with `tokenizers`, tiny random-init models) are also what the
tests use; every artefact is saved with save_pretrained and loaded back with from_pretrained.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

# --- tokenizer and model builders --------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_bytebpe(path: Path, corpus: list[str], vocab_size: int = 600) -> Path:
    """Byte-level BPE (Qwen/GPT-2 style) with a ChatML template and a non-special added token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(["<tool_call>"])  # added, not special: ordinary text
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return path


def build_sentencepiece(path: Path, corpus: list[str], gemma: bool, vocab_size: int = 500) -> Path:
    """SentencePiece-style BPE with byte fallback: Gemma-like (no dummy prefix, no Strip, chat
    template) or Llama-2-like (dummy prefix, Strip of one leading space on decode, no template)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=120,
                                                                show_progress=False))
    learned = json.loads(trainer_tok.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens(specials + ["<start_of_turn>", "<end_of_turn>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>",
                                       pad_token="<pad>", unk_token="<unk>", clean_up_tokenization_spaces=False)
        fast.chat_template = GEMMA
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tok.add_special_tokens(specials)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(path)
    return path


def build_model(path: Path, tokenizer_path: Path, family: str, seed: int = 0, extra_rows: int = 13,
                hidden: int = 32, layers: int = 2, head_init: float = 0.5) -> Path:
    """A tiny random-init causal LM of `family` (qwen2 | gemma3 | llama) with the tokenizer at
    tokenizer_path, saved to path. The embedding has `extra_rows` rows past the tokenizer (as Qwen2.5
    has); the output layer is initialised with std `head_init` so log-probabilities vary visibly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    common = dict(vocab_size=len(tok) + extra_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if family == "qwen2":
        from transformers import Qwen2Config
        config = Qwen2Config(**common)
    elif family == "gemma3":
        from transformers import Gemma3TextConfig
        config = Gemma3TextConfig(**common, head_dim=hidden // 4, sliding_window=16, final_logit_softcapping=30.0)
    elif family == "llama":
        from transformers import LlamaConfig
        config = LlamaConfig(**common)
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if head_init:
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0, head_init)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --- the toy language --------------------------------------------------------------------------------

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "a child", "the farmer", "our neighbour"]
VERBS = ["sees", "likes", "helps", "finds", "follows", "calls", "paints", "visits"]
OBJECTS = ["the ball", "a tree", "the house", "the river", "a book", "the garden", "the moon", "a boat"]
TAILS = [".", " today.", " again.", " in the morning.", " every day."]
HELD_OUT = SUBJECTS[-2:]  # evaluation prompts ask about subjects the generator never trains on


def toy_pair(rng: random.Random, subject: str) -> tuple[str, str]:
    """A (prompt, response) pair of the toy language: 1-2 sentences about the subject."""
    n = rng.choice([1, 2])
    response = " ".join(f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}" for _ in range(n))
    return f"Tell me about {subject}.", response


def scrambled_pair(rng: random.Random, subject: str) -> tuple[str, str]:
    """The toy language's words in random order: what the generator knows before CME-GRPO."""
    prompt, response = toy_pair(rng, subject)
    words = response.replace(".", " .").split()
    rng.shuffle(words)
    return prompt, " ".join(words)


def train_lm(path: Path, make_pair, seed: int, steps: int = 300, lr: float = 3e-3) -> None:
    """Next-token training on (prompt, response + EOS) pairs after the chat template, loss on responses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train import chat_prefix

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(32):
            p, r = make_pair(rng, rng.choice(SUBJECTS))
            head = tok(chat_prefix(tok, p), add_special_tokens=False).input_ids
            body = tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id]
            rows.append(head + body)
            labels.append([-100] * len(head) + body)
        L = max(len(x) for x in rows)
        x = torch.tensor([x + [pad] * (L - len(x)) for x in rows])
        y = torch.tensor([y + [-100] * (L - len(y)) for y in labels])
        attn = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
        loss = model(input_ids=x, attention_mask=attn, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)


def held_out_cme(model_path: Path, verifier, seed: int, samples: int = 4, max_new_tokens: int = 16):
    """Eq. 3 CME, under `verifier`, of a generator's samples on the held-out prompts.

    Returns (cme (N,) float64, the N (prompt, response) pairs)."""
    from train import Config, generate, load_generator

    device = torch.device("cpu")
    model, tok, _, eos_ids = load_generator(str(model_path), device)
    prompts = [f"Tell me about {s}." for s in HELD_OUT] * 4
    torch.manual_seed(seed)
    cfg = Config(group_size=samples, max_new_tokens=max_new_tokens, gen_batch=256)
    rollout = generate(model, tok, prompts, cfg, eos_ids, device)
    return verifier.sequence_cme(rollout.prompts, rollout.texts), list(zip(rollout.prompts, rollout.texts))


# --- the demo ----------------------------------------------------------------------------------------

DEMO_STEPS = 80


def run_demo(cfg, steps: int | None = None, lr: float = 1e-3) -> dict:
    """Build the toy world, train with the trained and the random verifier, print the table.

    cfg: a train.Config; its seed, out (default runs/demo) and max_steps (default 40) are used.
    Returns {"trained": (before, after), "random": (before, after), "noise": (before, resampled), ...}:
    mean held-out CMEs; "noise" is the untrained generator evaluated again with another sampling seed.
    """
    from reward import Verifier, load_causal_lm
    from train import Config, train

    out = Path(cfg.out if cfg.out != Config.out else "runs/demo")
    steps = steps or cfg.max_steps or DEMO_STEPS
    seed = cfg.seed
    world = out / "world"
    rng = random.Random(seed)
    corpus = [" ".join(toy_pair(rng, rng.choice(SUBJECTS))) for _ in range(400)]
    print("building the toy world: tokenizers, a verifier trained on the toy language, a generator trained on "
          "its words in scrambled order", flush=True)
    build_sentencepiece(world / "ver_tok", corpus, gemma=True, vocab_size=300)
    build_bytebpe(world / "gen_tok", corpus + ["1 2 3, ok? !", "{x: [y]}"], vocab_size=400)
    build_model(world / "verifier", world / "ver_tok", "gemma3", seed=seed, hidden=64, head_init=0.0)
    train_lm(world / "verifier", toy_pair, seed)
    build_model(world / "generator", world / "gen_tok", "qwen2", seed=seed + 1, hidden=64, head_init=0.0)
    train_lm(world / "generator", scrambled_pair, seed + 1, steps=150)
    train_prompts = world / "prompts.txt"
    train_prompts.write_text("".join(f"Tell me about {s}.\nTell me about {s}, please.\n" for s in SUBJECTS[:-2]))

    vmodel, vtok = load_causal_lm(str(world / "verifier"), dtype=torch.float32, device="cpu")
    judge = Verifier(vmodel, vtok)
    before, before_samples = held_out_cme(world / "generator", judge, seed)
    resampled, _ = held_out_cme(world / "generator", judge, seed + 1000)  # sampling noise alone

    base = replace(cfg, demo=False, gen=str(world / "generator"), verifier=str(world / "verifier"),
                   prompts=str(train_prompts), reward="token", group_size=8, prompts_per_step=4, micro_batch=32,
                   gen_batch=256, max_new_tokens=16, lr=lr, warmup_steps=2, epochs=-(-steps // 3),
                   max_steps=steps, sample_every=0, save_every=10 ** 9, device="cpu", resume=False)

    def judged(step, rollout):  # the step's rollouts under the trained verifier: one axis for both runs
        return {"judge_cme": float(np.nanmean(judge.sequence_cme(rollout.prompts, rollout.texts)))}

    results = {}
    for name, init in (("trained", "pretrained"), ("random", "random")):
        print(f"\nCME-GRPO with the {name} verifier ({steps} steps)", flush=True)
        run_out = out / f"{name}-verifier"
        history = train(replace(base, verifier_init=init, out=str(run_out)), on_step=judged)
        after, samples = held_out_cme(run_out / f"checkpoint-{steps}", judge, seed)
        results[name] = (float(np.nanmean(before)), float(np.nanmean(after)))
        results[f"{name}_curve"] = [h["judge_cme"] for h in history]
        results[f"{name}_samples"] = list(zip(after, samples))
    results["before_samples"] = list(zip(before, before_samples))

    se = float(np.nanstd(before) / np.sqrt(np.isfinite(before).sum()))
    results["before_se"] = se
    results["noise"] = (float(np.nanmean(before)), float(np.nanmean(resampled)))
    _print_table(results, se)
    for name, label in (("before", "before training"), ("trained_samples", "after, trained verifier"),
                        ("random_samples", "after, random verifier")):
        key = name if name.endswith("samples") else f"{name}_samples"
        print(f"\n{label}:")
        for cme, (prompt, response) in results[key][:6:2]:
            print(f"  CME {cme:5.2f}  {prompt!r} -> {response!r}")
    _plot(results, out / "demo.png")
    print(f"curves: {out / 'demo.png'}")
    return results


def _print_table(results: dict, se: float) -> None:
    print("\nmean verifier CME (Eq. 3, nats/token, under the trained verifier) on held-out prompts:")
    print(f"{'run':<34}{'before':>8}{'after':>8}{'drop':>8}")
    for name, label in (("trained", "CME-GRPO, trained verifier"), ("random", "control: random-weight verifier"),
                        ("noise", "no training, resampled")):
        b, a = results[name]
        print(f"{label:<34}{b:>8.2f}{a:>8.2f}{b - a:>8.2f}")
    print(f"(standard error of a 'before' mean: {se:.2f})")


def _plot(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("trained", "random"):
        ax.plot(range(1, len(results[f"{name}_curve"]) + 1), results[f"{name}_curve"], label=f"{name} verifier")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("CME of rollouts under trained verifier")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
