"""How much bf16 noise reaches the per-position advantages, with and without the shared-context rule.

    python bench_noise.py                       # the real small models of ../shared/models (see docs/real-models.md)
    python bench_noise.py --gen HuggingFaceTB/SmolLM2-135M-Instruct --verifier google/gemma-3-270m

Per-position advantages (Section 2) normalise each generator position across the G responses of a
prompt. Where the responses share an opening ("Sure! Here is ..."), their exact rewards there are equal
and A must be 0. A bf16 verifier whose micro-batches hold the G responses with different companions
and padding computes slightly different log-probs for the same context; divided by a sigma made of
that noise alone, they become unit-scale advantages. This script builds exactly that case with real
models: for each prompt, the generator's greedy opening of --opening tokens, then G continuations
sampled at temperature 1; the verifier scores all of them in bf16 with micro-batches of
--token-budget tokens (length-sorted, so members of a group land in different micro-batches). It prints,
side by side in one run:
  - the share of shared-opening entries with |A| > 0.5, with the rule off (share_context=False) and on;
  - the pure-noise sigma (sigma across G members of rewards that are exactly equal, rule off), whose
    high percentiles set the sigma floor `--adv-eps` of train.py, and what share of the real spreads
    (positions after the opening) such a floor would zero.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REAL = Path(os.environ.get("CME_REAL_MODELS", Path.home() / ".cache/cme-grpo/real-models"))
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
           "Write a short poem about the sea.", "Explain what a binary search does.",
           "How do vaccines work?", "Suggest a name for a coffee shop.",
           "Describe a sunset in two sentences.", "Why is the sky blue?",
           "List some fruits that are red.", "What should I pack for a beach trip?",
           "How do I boil an egg?", "Summarise the plot of Cinderella."]


def sample_group(model, tok, stop, prompt: str, G: int, opening: int, new_tokens: int, seed: int):
    """G responses to `prompt` that share the greedy opening of `opening` tokens: (G lists of ids)."""
    from sampling import chat_prefix, sampling_config

    x = torch.tensor([tok(chat_prefix(tok, prompt), add_special_tokens=False).input_ids])
    with torch.no_grad():
        head = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=opening, eos_token_id=stop, pad_token_id=stop[0])[0, x.shape[1]:]
        head = head[~torch.isin(head, torch.tensor(stop))]  # an opening never ends the response
        y = torch.cat([x[0], head])[None].repeat(G, 1)
        torch.manual_seed(seed)
        out = model.generate(input_ids=y, attention_mask=torch.ones_like(y),
                             generation_config=sampling_config(stop, stop[0], temperature=1.0, top_p=1.0,
                                                               max_new_tokens=new_tokens))[:, x.shape[1]:]
    rows = []
    for r in out.tolist():
        hit = next((k for k, t in enumerate(r) if k >= len(head) and t in stop), None)
        rows.append(r[:hit + 1] if hit is not None else r)
    return rows, len(head)


def fully_shared(vtok, gtok, prompts, ids, G: int) -> torch.Tensor:
    """(B, T) bool: generator positions inside the group's common opening whose aligned reward is built
    only from verifier tokens whose whole context every member of the group shares (found from the
    verifier's own encodings, independently of the scorer): their exact rewards are equal."""
    from align import decode_response, overlap_weights, text_to_response_bytes, token_byte_spans, token_bytes
    from reward import encode_pairs

    texts = [decode_response(token_bytes(gtok, r)) for r in ids]
    vins = encode_pairs(vtok, prompts, [t.text for t in texts])
    B, T = len(ids), max(len(r) for r in ids)
    out = torch.zeros(B, T, dtype=torch.bool)
    for g in range(0, B, G):
        seqs = [np.asarray(v.ids) for v in vins[g:g + G]]
        n = min(len(x) for x in seqs)
        lv = next((j for j in range(n) if len({int(x[j]) for x in seqs}) > 1), n)  # common verifier prefix
        ok = []
        for b in range(g, g + G):
            W = overlap_weights(token_byte_spans(gtok, ids[b]), text_to_response_bytes(texts[b], vins[b].spans))
            last = np.full(len(ids[b]), -1)
            np.maximum.at(last, W.t, vins[b].response[W.s])              # last verifier token per position
            ok.append((last >= 0) & (last < lv))
        width = min(len(x) for x in ok)
        both = np.logical_and.reduce([x[:width] for x in ok])
        out[g:g + G, :width] = torch.from_numpy(both.copy())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen", default=str(REAL / "smollm2-135m-instruct"), help="generator (default: the real "
                    "SmolLM2-135M-Instruct of ../shared/models)")
    ap.add_argument("--verifier", default=str(REAL / "gemma-3-270m"), help="verifier, scored in --dtype "
                    "(default: the real gemma-3-270m of ../shared/models)")
    ap.add_argument("--groups", type=int, default=8, help="prompts (default: 8)")
    ap.add_argument("--group-size", type=int, default=8, help="G (default: 8)")
    ap.add_argument("--opening", type=int, default=24, help="tokens of the shared greedy opening (default: 24)")
    ap.add_argument("--new-tokens", type=int, default=64, help="response length limit (default: 64)")
    ap.add_argument("--token-budget", type=int, default=512, help="verifier micro-batch, padded tokens "
                    "(default: 512, a few responses per micro-batch, as at the paper's scale)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="verifier dtype "
                    "(default: bfloat16, the paper's)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = ap.parse_args(argv)
    for name in ("groups", "group_size", "opening", "new_tokens", "token_budget"):
        if getattr(args, name) < (2 if name == "group_size" else 1):
            print(f"error: --{name.replace('_', '-')} is too small: {getattr(args, name)}", file=sys.stderr)
            return 2

    from grpo import per_position_advantages
    from reward import Verifier, load_causal_lm
    from sampling import load_generator

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    try:
        gen, gtok, _, stop = load_generator(args.gen, torch.device("cpu"))
        vmodel, vtok = load_causal_lm(args.verifier, dtype=getattr(torch, args.dtype), device="cpu")
    except ValueError as e:
        print(f"error: {e} (build the real models with python ../shared/models/build_real_models.py, "
              "or pass hub ids)", file=sys.stderr)
        return 2
    G, prompts, ids, opening = args.group_size, [], [], []
    for k in range(args.groups):
        p = PROMPTS[k % len(PROMPTS)]
        rows, n_open = sample_group(gen, gtok, stop, p, G, args.opening, args.new_tokens, args.seed + k)
        prompts += [p] * G
        ids += rows
        opening += [n_open] * G
    t1 = time.perf_counter()

    B, T = len(ids), max(len(r) for r in ids)
    shared = torch.zeros(B, T, dtype=torch.bool)        # positions inside the group's common opening
    for g in range(0, B, G):
        group = ids[g:g + G]
        n = min(len(r) for r in group)
        lcp = next((t for t in range(n) if len({r[t] for r in group}) > 1), n)
        shared[g:g + G, :lcp] = True
    exact = fully_shared(vtok, gtok, prompts, ids, G) & shared
    result = {}
    for rule in (False, True):
        v = Verifier(vmodel, vtok, token_budget=args.token_budget, share_context=rule)
        rewards, mask = v.token_rewards(prompts, gtok, ids)
        adv = per_position_advantages(rewards, mask, G, eps=1e-4)  # the old floor: exact ties only
        entries = exact & mask
        r = rewards.double().reshape(-1, G, T)
        m = mask.reshape(-1, G, T)
        n = m.sum(1)
        mu = torch.where(m, r, 0).sum(1) / n.clamp(min=1)
        sigma = (torch.where(m, (r - mu[:, None]) ** 2, 0).sum(1) / (n - 1).clamp(min=1)).sqrt()  # (B/G, T)
        all_exact = (exact & mask).reshape(-1, G, T).all(1) & (n == G)
        opening_only = shared & mask & ~exact
        result[rule] = dict(big=float((adv.abs() > 0.5)[entries].float().mean()), entries=int(entries.sum()),
                            edge=float((adv.abs() > 0.5)[opening_only].float().mean()), n_edge=int(opening_only.sum()),
                            noise_sigma=sigma[all_exact].numpy(),
                            real_sigma=sigma[~shared.reshape(-1, G, T).all(1) & (n >= 2)].numpy(),
                            rewards=rewards, mask=mask)
    t2 = time.perf_counter()

    off, on = result[False], result[True]
    same = bool(torch.equal(off["mask"], on["mask"]))
    diff = (off["rewards"] - on["rewards"]).abs()[off["mask"] & ~shared]
    q = [50, 90, 99, 100]
    pct = np.percentile(off["noise_sigma"], q)
    real = off["real_sigma"]
    print(f"generator {args.gen}\nverifier  {args.verifier} in {args.dtype}, micro-batches of {args.token_budget} "
          f"padded tokens\n{args.groups} prompts x G = {G}, shared greedy opening {args.opening} tokens, "
          f"responses up to {args.new_tokens} tokens (seed {args.seed})\n")
    print(f"entries whose whole verifier context the group shares: {off['entries']} "
          f"(of {int(off['mask'].sum())} scored entries)")
    print(f"  share with |A| > 0.5, rule off: {100 * off['big']:5.1f}%")
    print(f"  share with |A| > 0.5, rule on:  {100 * on['big']:5.1f}%")
    print(f"entries at the end of an opening whose verifier tokens reach past it (real differences): "
          f"{off['n_edge']}, |A| > 0.5: {100 * off['edge']:.1f}% off, {100 * on['edge']:.1f}% on")
    print(f"  rule changes rewards outside the openings: max |diff| {float(diff.max()) if len(diff) else 0:.2e}"
          f" (masks equal: {same})")
    print("\npure-noise sigma (sigma across G of exactly-equal rewards, rule off), nats:")
    print("  " + "  ".join(f"p{p} {v:.2e}" for p, v in zip(q, pct)))
    print("real spreads after the opening (sigma at positions the group does not share), nats:")
    print("  " + "  ".join(f"p{p} {v:.2e}" for p, v in zip([1, 5, 50], np.percentile(real, [1, 5, 50]))))
    for floor in (1e-4, 1e-3, 1e-2, 2e-2, 5e-2):
        print(f"  a floor of {floor:.0e} zeroes {100 * float((off['noise_sigma'] <= floor).mean()):5.1f}% of the "
              f"noise-only positions and {100 * float((real <= floor).mean()):5.2f}% of the real ones")
    print(f"\ngeneration {t1 - t0:.0f} s, scoring (both rules) {t2 - t1:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
