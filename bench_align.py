"""Benchmark: span + alignment time of align.py against a prefix-decoding baseline, in one run.

    python bench_align.py                          # real tokenizers from ../shared when present
    python bench_align.py --gen Qwen/Qwen2.5-0.5B --ver google/gemma-3-1b-it

For one response pair of --tokens generator tokens it times, excluding any model forward:
  ours:     generator byte spans from the vocabulary (align.token_byte_spans), response text, the
            verifier's encoding and its spans (reward.encode_pair), the weights and the aligned values;
  baseline: generator spans by decoding every prefix and diffing lengths (the usual approach: quadratic,
            and wrong around partial characters), then the same verifier encoding and alignment.
Not a test: it prints times and their ratio.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import numpy as np

from align import (align_logprobs, decode_response, overlap_weights, text_to_response_bytes,
                   token_byte_spans, token_bytes, vocab_bytes, whitespace_tokens)
from reward import encode_pair, encode_pairs, prompt_prefix

SHARED = Path(__file__).resolve().parent.parent / "shared"
PARAGRAPH = ("Vaccines train the immune system to recognise a pathogen. 疫苗通过训练免疫系统来识别病原体。 "
             "Herd immunity 👨‍👩‍👧 protects those who cannot be vaccinated: café, naïve, e\u0301.\n\n"
             "```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n```\n")


def response_text(gen_tok, tokens: int) -> str:
    """About `tokens` generator tokens of real answers (AlpacaEval outputs in ../shared) or a fixed text."""
    path = SHARED / "data" / "alpaca_eval" / "outputs" / "gpt4_1106_preview.jsonl.gz"
    parts = [json.loads(line)["output"] for line in gzip.open(path, "rt")][:60] if path.exists() else [PARAGRAPH] * 200
    text = "\n\n".join(parts)
    ids = gen_tok.encode(text, add_special_tokens=False)[:tokens]
    return gen_tok.decode(ids)


def ours(gen_tok, ver_tok, prompt, ids, logp_of):
    rt = decode_response(token_bytes(gen_tok, ids))
    return ours_given_encoding(gen_tok, rt, encode_pair(ver_tok, prompt, rt.text), ids, logp_of)


def ours_given_encoding(gen_tok, rt, vin, ids, logp_of):
    """Our span + alignment work once the response text `rt` is decoded and the verifier has encoded it."""
    gspans = token_byte_spans(gen_tok, ids)
    vspans = text_to_response_bytes(rt, vin.spans)
    return align_logprobs(gspans, vspans, logp_of(len(vspans)), whitespace_tokens(gen_tok, ids))


def encoding_only(ver_tok, prompt, text):
    """The verifier's tokenization of prefix + response (Rust), which any method needs for the forward."""
    ver_tok.backend_tokenizer.encode(prompt_prefix(ver_tok, prompt) + text, add_special_tokens=False)


def baseline(gen_tok, ver_tok, prompt, ids, logp_of):
    ends = [len(gen_tok.decode(ids[:k]).encode("utf-8")) for k in range(1, len(ids) + 1)]  # O(T^2)
    ends = np.maximum.accumulate(np.array(ends, dtype=np.int64))
    gspans = np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1)
    text = gen_tok.decode(ids)
    vin = encode_pair(ver_tok, prompt, text)
    return align_logprobs(gspans, vin.spans, logp_of(len(vin.spans)), whitespace_tokens(gen_tok, ids))


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    local = SHARED / "tokenizers"
    ap.add_argument("--gen", default=str(local / "qwen2.5") if local.exists() else "Qwen/Qwen2.5-0.5B")
    ap.add_argument("--ver", default=str(local / "llama-2") if local.exists() else "google/gemma-3-1b-it")
    ap.add_argument("--tokens", type=int, default=2048, help="generator tokens in the response")
    ap.add_argument("--repeat", type=int, default=30, help="runs of our path (median reported)")
    args = ap.parse_args()

    from transformers import AutoTokenizer
    try:
        gen_tok, ver_tok = AutoTokenizer.from_pretrained(args.gen), AutoTokenizer.from_pretrained(args.ver)
    except OSError as e:
        raise SystemExit(f"error: cannot load tokenizer {args.gen!r} or {args.ver!r} (offline? pass local "
                         f"tokenizer folders with --gen and --ver): {str(e).splitlines()[0]}") from None
    t = time.perf_counter()
    vocab_bytes(gen_tok), vocab_bytes(ver_tok)
    build = time.perf_counter() - t
    text = response_text(gen_tok, args.tokens)
    ids = gen_tok.encode(text, add_special_tokens=False)
    prompt = "Explain how vaccines work."
    rng = np.random.default_rng(0)
    logp_of = lambda n: -rng.exponential(2.0, n)  # noqa: E731  (stand-in for the verifier forward)
    n_ver = len(encode_pair(ver_tok, prompt, text).response)
    W = overlap_weights(token_byte_spans(gen_tok, ids), encode_pair(ver_tok, prompt, text).spans)

    rt = decode_response(token_bytes(gen_tok, ids))
    vin = encode_pair(ver_tok, prompt, rt.text)
    t_align = timed(lambda: ours_given_encoding(gen_tok, decode_response(token_bytes(gen_tok, ids)), vin, ids,
                                                logp_of), args.repeat)  # the decode is ours too: timed
    t_ours = timed(lambda: ours(gen_tok, ver_tok, prompt, ids, logp_of), args.repeat)
    t_encode = timed(lambda: encoding_only(ver_tok, prompt, text), args.repeat)
    batch = 64
    t_batch = timed(lambda: encode_pairs(ver_tok, [prompt] * batch, [rt.text] * batch), 3) / batch
    t_base = timed(lambda: baseline(gen_tok, ver_tok, prompt, ids, logp_of), 1)
    print(f"generator {args.gen} ({len(ids)} tokens), verifier {args.ver} ({n_ver} tokens), "
          f"{len(text.encode())} bytes, {len(W.w)} non-zero weights")
    print(f"byte tables, once per tokenizer:          {build * 1e3:9.1f} ms")
    print(f"ours, spans + alignment (no tokenization): {t_align * 1e3:8.3f} ms  (median of {args.repeat})")
    print(f"the verifier's plain tokenization alone:   {t_encode * 1e3:8.3f} ms")
    print(f"ours, all of it for one pair:              {t_ours * 1e3:8.3f} ms")
    print(f"ours, all of it, {batch} pairs batched, per pair: {t_batch * 1e3:8.3f} ms  (encoding in Rust threads)")
    print(f"baseline, prefix decoding + same rest:     {t_base * 1e3:8.1f} ms")
    print(f"speed-up, one pair, all of it: {t_base / t_ours:.0f}x; spans + alignment vs baseline: "
          f"{t_base / t_align:.0f}x")


if __name__ == "__main__":
    main()
