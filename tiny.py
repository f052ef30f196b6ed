"""Tiny tokenizers and models, built offline: what the tests and the toy demo run on.

    tok = build_bytebpe(tmp / "tok", corpus)                    # Qwen-like byte-level BPE, ChatML
    sp = build_sentencepiece(tmp / "sp", corpus, gemma=True)   # Gemma-like SentencePiece BPE, byte fallback
    model = build_model(tmp / "qwen2", tok, "qwen2")            # a random-init Qwen2 (or gemma3, llama)

Tokenizers are trained with `tokenizers` on the corpus given and models are random-init from a
transformers config; every artefact is saved with save_pretrained, so it is loaded back with
from_pretrained, the path users take with hub models. No download anywhere.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

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
    # the 120 most frequent characters, ties broken by the character: the trainer's own limit_alphabet
    # breaks ties in hash order, which made two builds of the same corpus differ
    counts = Counter(c for line in corpus for c in line.replace(" ", "\u2581"))
    alphabet = sorted(counts, key=lambda c: (-counts[c], c))[:120]
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                                                limit_alphabet=len(alphabet), show_progress=False))
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
