"""Shared test material, built here so the tests need nothing downloaded.

Tokenizers are trained with `tokenizers` on a small multilingual corpus, saved with save_pretrained
and loaded back with AutoTokenizer.from_pretrained, the path users take:
  - "bytebpe":  byte-level BPE with a ChatML chat template and a non-special added token (Qwen-like);
  - "sp_llama": SentencePiece-style BPE with byte fallback, dummy prefix and a leading-space Strip
                decoder, no chat template (Llama-2-like);
  - "sp_gemma": SentencePiece-style BPE with byte fallback, no dummy prefix, no Strip, and a Gemma
                chat template (Gemma-3-like).
Tiny random-init models (Qwen2, Gemma3 with logit soft-capping, Llama) are saved and reloaded the same way.
Real tokenizers from ../shared/tokenizers are used where that folder exists.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = ROOT.parent / "shared"
REAL_TOKENIZERS = ["qwen2.5", "llama-3.2", "llama-2", "mistral-7b-v0.1"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}",
    "中文文本测试，这是一个句子。我们喜欢学习语言。",
    "日本語のテキストです。東京は大きい都市です。",
    "مرحبا بالعالم، هذه جملة عربية قصيرة.",
    "Emoji: 😀 😂 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and café, naïve, résumé, e\u0301.",
    "Math: ∑ x² ≤ ∞, α β γ; prices: $5.99, €10, £3.",
    "Lists:\n- one\n- two\n\n1. first\n2. second\n",
    "unhappiness happiness unhappy kindness darkness sadness",
    "   leading spaces, trailing spaces   \n\n\n   and tabs\t\there.",
]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _corpus(repeat: int = 20):
    return [line for _ in range(repeat) for line in CORPUS]


def build_bytebpe(path: Path, vocab_size: int = 600) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens(["<tool_call>"])  # added, not special: ordinary text
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return path


def build_sentencepiece(path: Path, gemma: bool, vocab_size: int = 500) -> Path:
    """SentencePiece-style BPE with byte fallback, built from a BPE trained on '▁'-marked words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=120, show_progress=False)
    trainer_tok.train_from_iterator(_corpus(), trainer)
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
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    if gemma:
        tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>",
                                       pad_token="<pad>", unk_token="<unk>", clean_up_tokenization_spaces=False)
        fast.chat_template = GEMMA
    else:
        tok.add_special_tokens(["<unk>", "<s>", "</s>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(path)
    return path


def build_model(path: Path, tokenizer_path: Path, family: str, seed: int = 0, extra_rows: int = 13) -> Path:
    """A tiny random-init causal LM of `family`, with the tokenizer at tokenizer_path, saved to path.

    The embedding has `extra_rows` more rows than the tokenizer has tokens (like Qwen2.5's padding rows).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    V = len(tok) + extra_rows
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "qwen2":
        from transformers import Qwen2Config as C
        config = C(**common)
    elif family == "gemma3":
        from transformers import Gemma3TextConfig as C
        config = C(**common, head_dim=8, sliding_window=16, final_logit_softcapping=30.0)
    elif family == "llama":
        from transformers import LlamaConfig as C
        config = C(**common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger logits than the default init, so log-probs vary visibly
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Paths of the tiny tokenizers and models, built once per test session."""
    d = tmp_path_factory.mktemp("built")
    paths = {
        "bytebpe": build_bytebpe(d / "bytebpe"),
        "sp_llama": build_sentencepiece(d / "sp_llama", gemma=False),
        "sp_gemma": build_sentencepiece(d / "sp_gemma", gemma=True),
    }
    paths["qwen2"] = build_model(d / "qwen2", paths["bytebpe"], "qwen2")
    paths["gemma3"] = build_model(d / "gemma3", paths["sp_gemma"], "gemma3")
    paths["llama"] = build_model(d / "llama", paths["sp_llama"], "llama")
    return paths


@pytest.fixture(scope="session")
def tokenizers(built):
    """name -> loaded tokenizer, for the three tiny ones and the real ones present in ../shared."""
    from transformers import AutoTokenizer

    toks = {name: AutoTokenizer.from_pretrained(built[name]) for name in ("bytebpe", "sp_llama", "sp_gemma")}
    for name in REAL_TOKENIZERS:
        if (SHARED / "tokenizers" / name).is_dir():
            toks[name] = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / name)
    return toks


def real_tokenizer(name: str):
    """A real tokenizer from ../shared/tokenizers, or skip the test where that folder is absent."""
    from transformers import AutoTokenizer

    path = SHARED / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (test data only in the development checkout)")
    return AutoTokenizer.from_pretrained(path)
