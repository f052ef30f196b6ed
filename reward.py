"""The batched verifier scorer of CME-GRPO: token-level CME (Eq. 1) and sequence-level CME (Eq. 3).

    r_{i,t} = -CME_{i,t} = log p_verifier(y_{i,t}^aligned | x, y_{i,<t}^aligned)        (Eq. 1)
    CME(y_i) = 1/S_i sum_s -log p_verifier(z_{i,s} | x, z_{i,<s}),   r_i = -CME(y_i)      (Eq. 3)

How a (prompt, response) pair becomes the verifier's input, and where this departs from the paper:
  1. Template. The verifier's chat template is rendered with the prompt as the user turn and a
     sentinel as the assistant turn; everything before the sentinel is the prefix and the raw response
     is spliced in after it (templates that trim or strip content cannot touch the response; the
     rendered text already holds BOS, so nothing is added when encoding). The turn's closing tokens
     are not scored. A verifier without a chat template gets `bos_token + PLAIN_TEMPLATE`.
  2. Encoding. Prefix and response are encoded as one string, so the verifier sees its own canonical
     tokenization. Special-token text is matched only up to the prefix's last added token; after it
     (the template's tail and the whole response) special tokens are split, so a response that
     contains the literal text "<|im_end|>" is scored as that text, never as a control token. (Control
     text inside the *prompt* is read the way the chat template reads it, as the generator's own
     `apply_chat_template` does.)
  3. Boundary. A verifier token straddling the prefix/response boundary (Llama-2's "▁The" after
     "[/INST] ", Qwen's merged newlines) belongs to the response and counts in full, its span clipped
     to the response bytes. A token holding no response byte is not the response's (align.py, item 4).
     The verifier's tokens of the response are exactly those; Eq. 3's S_i counts them.
  4. Same tokenizer. When the verifier's tokenizer is the generator's, the generator's own ids are
     scored after the prefix and the alignment is the identity (the same numbers as the general path
     whenever the ids are the tokenizer's encoding of their text; for a non-canonical sampled
     segmentation it scores the sampled tokens themselves).
  5. An empty response has no verifier tokens: its Eq. 3 CME is NaN here. Training gives such a
     response, and one of whitespace only (Eq. 1 masks every position of it), the lowest reward of its
     group (`grpo.floor_unscored`), never a NaN.
  6. Shared context, one value. A verifier token whose whole context (every id before it, and its own)
     is identical across several pairs of a call gets one value for all of them: the log-probability
     from a forward pass of that shared prefix alone (batch of one, no padding), whatever the
     micro-batching. Responses of a group that share an opening ("Sure! Here is ...") then get
     bit-identical rewards there, so their per-position advantages are exactly 0 instead of bf16 noise
     turned into unit-scale advantages (batch composition moves bf16 log-probs by 0.01-0.1 nats).
     Each shared node is scored by exactly one such forward (that of the first pair reaching it in
     lexicographic order), so the values depend only on the ids, never on the token budget or on the
     other pairs of the call. `share_context=False` turns it off (for measuring what it removes).
  7. End of turn. The paper scores the response's text only: EOS has no text, so no reward. With
     `ended` (the `--eos-reward` option of train.py) a pair that stopped gets the verifier's own
     end-of-turn token (`turn_end`: "<end_of_turn>" for Gemma, "<|im_end|>" for ChatML, EOS without a
     template) appended, and its log-probability is the reward at the generator's EOS position (Eq. 1)
     or one more term of the mean (Eq. 3). A truncated response has no EOS and gets no such term.

Speed and memory: pairs are sorted by length and packed into micro-batches of at most `token_budget`
padded tokens (length sorting keeps padding small); the verifier is frozen (`requires_grad_(False)`,
`eval()`) and runs under `torch.inference_mode()` (no autograd bookkeeping); log-probabilities are
computed in chunks of positions (`grpo.token_logprobs`) so no float32 (batch, length, vocab) logits
tensor ever exists. Load it in bf16 on a GPU (`load_causal_lm`).

Shape letters: B pairs, T generator tokens, S verifier tokens, L verifier sequence length.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from align import (align_logprobs, decode_response, encoding_byte_spans, text_to_response_bytes,
                   tile_spans, token_byte_spans, token_bytes, vocab_bytes, whitespace_tokens)
from grpo import token_logprobs

__all__ = ["PLAIN_TEMPLATE", "Prompt", "prompt_prefix", "turn_end", "VerifierInput", "encode_pairs", "encode_pair",
           "same_tokenizer",
           "check_device", "load_causal_lm", "Verifier"]

PLAIN_TEMPLATE = "User: {prompt}\nAssistant: "
"""Prompt format for a tokenizer with no chat template (base models), after its BOS token if any."""

_SENTINEL = "<<CME-GRPO-RESPONSE-7f3a>>"

Prompt = "str | list[dict]"
"""What the verifier reads before a response: a user message (str), or a whole conversation, a list of
{"role", "content"} dicts (TRL's conversational prompts), to which the response is the assistant's reply."""


def prompt_prefix(tokenizer, prompt: Prompt) -> str:
    """The text that precedes the response: the chat template up to the assistant's content.

    prompt: a user message, or a conversation (`Prompt`). Without a chat template a conversation is
    written "Role: content" per message, as PLAIN_TEMPLATE writes a single user message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not getattr(tokenizer, "chat_template", None):
        if isinstance(prompt, str):
            return (tokenizer.bos_token or "") + PLAIN_TEMPLATE.format(prompt=prompt)
        turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return (tokenizer.bos_token or "") + turns + "Assistant: "
    rendered = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
    at = rendered.find(_SENTINEL)
    if at < 0:
        raise ValueError("the chat template dropped the assistant turn's content; cannot place the response")
    return rendered[:at]


def turn_end(tokenizer) -> str:
    """The control token that closes the assistant's turn: the first special token the chat template
    writes after the assistant's content ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "</s>"), or the
    tokenizer's EOS without a chat template. "" if there is none (a template closing turns with text).
    """
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token or ""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    after = rendered[rendered.find(_SENTINEL) + len(_SENTINEL):].lstrip()
    enc = tokenizer.backend_tokenizer.encode(after, add_special_tokens=False) if after else None
    if enc is None or not enc.ids or not vocab_bytes(tokenizer).special[enc.ids[0]]:
        return ""
    return tokenizer.convert_ids_to_tokens(enc.ids[0])


@dataclass
class VerifierInput:
    """One (prompt, response) pair as the verifier reads it.

    ids: (L,) list of int, verifier token ids of prefix + response (+ the end-of-turn token, see `end`).
    response: (R,) int64, positions in ids of the verifier tokens that hold response bytes.
    spans: (R, 2) int64, their [start, end) bytes in the response text's UTF-8, tiling it.
    end: position in ids of the appended end-of-turn token (module docstring, item 7), or -1.
    """
    ids: list
    response: np.ndarray
    spans: np.ndarray
    end: int = -1


def encode_pairs(tokenizer, prompts: Sequence[Prompt], responses: Sequence[str],
                 ended: Sequence[bool] | None = None) -> list[VerifierInput]:
    """Build the verifier's inputs for many pairs and locate each response's bytes in its tokens.

    tokenizer: the verifier's fast tokenizer. prompts: B prompts (`Prompt`). responses: B strings.
    ended: B bools, the pairs that get the verifier's end-of-turn token appended (module docstring,
    item 7); None: none.
    See the module docstring for the rules. The encoding runs batched in the tokenizer's Rust threads.
    """
    end_id = _end_id(tokenizer) if ended is not None and any(ended) else None
    backend = tokenizer.backend_tokenizer
    added = vocab_bytes(tokenizer).added
    prefix_of = _prefixes(tokenizer, prompts)  # rendered and encoded once per distinct prompt, not G times
    unique = list(prefix_of.values())
    split = {}
    for prefix, enc in zip(unique, backend.encode_batch(unique, add_special_tokens=False)):
        last = max((k for k, i in enumerate(enc.ids) if added[i]), default=-1)
        split[prefix] = (enc.ids[:last + 1], enc.offsets[last][1] if last >= 0 else 0)  # up to the last added token
    prefixes = [prefix_of[_key(p)] for p in prompts]
    heads, cuts = zip(*(split[p] for p in prefixes)) if prefixes else ((), ())
    tails = [p[c:] + r for p, c, r in zip(prefixes, cuts, responses)]
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True  # set and restored by hand (ALIGNMENT-NOTES item 7)
    try:
        encs = backend.encode_batch(tails, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = previous
    out = []
    for i, (head, prefix, cut, tail, response, enc) in enumerate(zip(heads, prefixes, cuts, tails, responses, encs)):
        start = len(prefix[cut:].encode("utf-8"))
        spans = encoding_byte_spans(tokenizer, enc.ids, np.asarray(enc.offsets, np.int64), tail)
        index, tiled = tile_spans(spans, start, start + len(response.encode("utf-8")))
        index = index + len(head)
        if len(index) and index[0] == 0:
            raise ValueError("the verifier input has no token before the response; the verifier needs a "
                             "BOS token or a chat template")
        ids = list(head) + list(enc.ids)
        end = -1
        if end_id is not None and ended[i]:
            end = len(ids)
            ids.append(end_id)
        out.append(VerifierInput(ids, index, tiled, end))
    return out


def _key(prompt: Prompt) -> str:
    """A hashable stand-in for a prompt (a conversation is a list)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _prefixes(tokenizer, prompts: Sequence[Prompt]) -> dict:
    """{_key(prompt): prompt_prefix(tokenizer, prompt)}, each distinct prompt rendered once."""
    return {_key(p): prompt_prefix(tokenizer, p) for p in {_key(p): p for p in prompts}.values()}


def _end_id(tokenizer) -> int:
    """The id of `turn_end(tokenizer)`; a clear error where the verifier has none."""
    text = turn_end(tokenizer)
    if not text:
        raise ValueError("the verifier has no end-of-turn token (no chat-template turn end and no EOS); "
                         "end-of-turn rewards need one")
    return tokenizer.convert_tokens_to_ids(text)


def encode_pair(tokenizer, prompt: str, response: str, ended: bool = False) -> VerifierInput:
    """`encode_pairs` for one (prompt, response) pair."""
    return encode_pairs(tokenizer, [prompt], [response], [ended])[0]


def same_tokenizer(a, b) -> bool:
    """Whether two fast tokenizers tokenize and decode identically (same model, rules and added tokens)."""
    if a is b:
        return True
    keys = ("model", "normalizer", "pre_tokenizer", "decoder", "added_tokens")
    ja, jb = (json.loads(t.backend_tokenizer.to_str()) for t in (a, b))
    return all(ja.get(k) == jb.get(k) for k in keys)


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch device named (None: cuda when available, else cpu), or one line saying why not."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    return dev


def load_causal_lm(name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                   init: str = "pretrained", seed: int = 0, trust_remote_code: bool = False):
    """Load (model, tokenizer) from a hub id or a local folder.

    dtype: default bf16 on CUDA, fp32 on CPU. init: "pretrained" weights; "random": the same
    architecture with seeded random weights (the random-verifier control of Section 4); "uniform": the
    same with its output layer zeroed, so every next-token distribution is uniform and every token
    costs exactly log(vocabulary size): Eq. 1 then rewards a generator token only by how many verifier
    tokens it covers (the pure-granularity control of `python demo.py`).
    Raises ValueError with one line when the name is neither a local folder nor a reachable hub id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        if init in ("random", "uniform"):
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            if init == "uniform":  # logits all 0 (a tied embedding is zeroed too: the logits still are)
                with torch.no_grad():
                    head = model.get_output_embeddings()
                    head.weight.zero_()
                    if getattr(head, "bias", None) is not None:
                        head.bias.zero_()
        elif init == "pretrained":
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            raise ValueError(f"init must be 'pretrained', 'random' or 'uniform', not {init!r}")
    except OSError as e:
        raise ValueError(f"cannot load model {name!r}: not a local folder with a model, and not "
                         f"reachable on the Hugging Face hub ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # a folder that is not a model (no model_type, a tokenizer only, ...)
        if str(e).startswith("init must be"):
            raise
        raise ValueError(f"cannot load model {name!r}: {str(e).splitlines()[0] if str(e) else 'not a model'}") from None
    return model.to(device), tokenizer


class Verifier:
    """A frozen verifier model that scores responses (Eq. 1 and Eq. 3), many pairs per call.

    model: a transformers causal LM; frozen here. tokenizer: its fast tokenizer.
    token_budget: padded tokens per micro-batch (rows x longest row).
    chunk_size: positions per output-layer chunk (see grpo.token_logprobs).
    mask_whitespace: Appendix B's whitespace masking (align.py, item 3).
    share_context: one value for a token whose whole context several pairs share (module docstring, item 6).
    """

    def __init__(self, model, tokenizer, token_budget: int = 16384, chunk_size: int = 1024,
                 mask_whitespace: bool = True, share_context: bool = True):
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.mask_whitespace = mask_whitespace
        self.share_context = share_context
        self._same: dict = {}

    @property
    def uniform_logprob(self) -> float:
        """-log V: the log-probability of a uniform guess over the verifier's V tokens (the reward of a
        response with nothing to score, `grpo.floor_unscored`)."""
        return -float(np.log(self.model.get_output_embeddings().weight.shape[0]))

    # --- the batched forward ---
    def logprobs(self, ids: Sequence[Sequence[int]], positions: Sequence[np.ndarray],
                 progress: bool = False, rows: Sequence[int] | None = None) -> list[np.ndarray]:
        """Verifier log-probabilities of chosen tokens of many sequences.

        ids: B sequences of token ids (lengths L_b). positions: B int arrays, the positions wanted.
        rows: the sequences to score (default all); the others are context only (module docstring,
            item 6): each row gets exactly the values it would get in a call that scores all B, so
            processes that each score their own rows of one batch agree with one process scoring it all.
        Returns len(rows) float64 arrays, log p(ids[b][j] | ids[b][:j]) for j in positions[b]. With
        share_context, a position whose ids up to and including it another sequence shares gets the
        value of one batch-of-one forward of that shared prefix (module docstring, item 6).
        """
        positions = [np.asarray(p, dtype=np.int64) for p in positions]
        rows = list(range(len(ids))) if rows is None else [int(b) for b in rows]
        out = self._forward([ids[b] for b in rows], [positions[b] for b in rows], progress)
        if self.share_context and len(ids) > 1:
            row_of = {b: k for k, b in enumerate(rows)}
            for b, (where, values) in _shared_values(self._forward, ids, positions, rows).items():
                k = row_of[b]
                out[k] = out[k].copy()
                out[k][where] = values
        return out

    def _forward(self, ids, positions, progress: bool = False) -> list[np.ndarray]:
        """The plain batched forward of `logprobs`: length-sorted micro-batches of token_budget tokens."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda b: -len(ids[b]))  # longest first: little padding
        batches, current = [], []
        for b in order:
            if current and (len(current) + 1) * len(ids[current[0]]) > self.token_budget:
                batches.append(current)
                current = []
            current.append(b)
        if current:
            batches.append(current)
        out: list = [None] * len(ids)
        pad = self.tokenizer.pad_token_id or 0
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="verifier", unit="pair")
        for batch in batches:
            L = len(ids[batch[0]])
            x = torch.full((len(batch), L), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), L), dtype=torch.long)
            want = torch.zeros((len(batch), L), dtype=torch.bool)
            for row, b in enumerate(batch):  # right padding: earlier positions never see it
                x[row, :len(ids[b])] = torch.as_tensor(ids[b])
                attn[row, :len(ids[b])] = 1
                want[row, torch.as_tensor(positions[b], dtype=torch.long)] = True
            with torch.inference_mode():
                logp = token_logprobs(self.model, x.to(device), attn.to(device), want.to(device),
                                      chunk_size=self.chunk_size).cpu().double().numpy()
            for row, b in enumerate(batch):
                out[b] = logp[row, positions[b]]
            if bar:
                bar.update(len(batch))
        if bar:
            bar.close()
        return out

    # --- Eq. 3 ---
    def sequence_cme(self, prompts: Sequence[Prompt], responses: Sequence[str], progress: bool = False,
                     ended: Sequence[bool] | None = None, rows: Sequence[int] | None = None) -> np.ndarray:
        """Sequence-level CME (Eq. 3): mean NLL over the verifier's own tokens of each response.

        prompts, responses: B prompts (`prompt_prefix`) and B strings. ended: B bools, pairs whose
        verifier end-of-turn token counts as one more token of the mean (module docstring, item 7);
        None: the paper's rule. rows: the pairs to score, the others being context (`logprobs`).
        Returns (len(rows),) float64 CME (the reward is its negative); NaN for an empty response.
        """
        inputs = encode_pairs(self.tokenizer, prompts, responses, ended)
        wanted = [np.append(v.response, v.end) if v.end >= 0 else v.response for v in inputs]
        logps = self.logprobs([v.ids for v in inputs], wanted, progress, rows)
        return np.array([-lp.mean() if len(lp) else np.nan for lp in logps])  # Eq. 3

    # --- Eq. 1 ---
    def token_rewards(self, prompts: Sequence[Prompt], gen_tokenizer, gen_ids: Sequence[Sequence[int]],
                      progress: bool = False, ended: Sequence[bool] | None = None,
                      rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level rewards r_{i,t} = aligned verifier log-prob on the generator's tokens (Eq. 1).

        prompts: B prompts (`prompt_prefix`). gen_tokenizer: the generator's fast tokenizer.
        gen_ids: B sequences of sampled generator ids (response only; EOS and padding may be there,
            they have no text and are masked).
        ended: B bools, responses whose last id is the stop token that ended them; that position gets
            the verifier's end-of-turn log-prob (module docstring, item 7). None: the paper's rule.
        rows: the responses to score, the others being context (`logprobs`); default all.
        Returns (rewards (R, T) float32, mask (R, T) bool) for the R rows, T the longest of them; both
        zero/False past each response's end.
        """
        key = id(gen_tokenizer)
        if key not in self._same:
            self._same[key] = same_tokenizer(gen_tokenizer, self.tokenizer)
        identity = self._same[key]
        B = len(gen_ids)
        rows = list(range(B)) if rows is None else [int(b) for b in rows]
        T = max((len(gen_ids[b]) for b in rows), default=0)
        rewards, mask = torch.zeros(len(rows), T), torch.zeros(len(rows), T, dtype=torch.bool)
        ended = [False] * B if ended is None else [bool(e) and len(g) > 0 for e, g in zip(ended, gen_ids)]
        seqs, positions, plans = [], [], []
        gen_ids = [np.asarray(ids, dtype=np.int64) for ids in gen_ids]
        if identity:  # the verifier reads the generator's own tokens after its prefix
            prefix_of = _prefixes(self.tokenizer, prompts)
            encoded = dict(zip(prefix_of, self.tokenizer.backend_tokenizer.encode_batch(
                list(prefix_of.values()), add_special_tokens=False)))
            heads = [encoded[_key(p)] for p in prompts]
            end_id = _end_id(self.tokenizer) if any(ended) else None
        else:
            texts = [decode_response(token_bytes(gen_tokenizer, ids)) for ids in gen_ids]
            vins = encode_pairs(self.tokenizer, prompts, [t.text for t in texts], ended)
        for i, ids in enumerate(gen_ids):
            gspans = token_byte_spans(gen_tokenizer, ids)
            whitespace = whitespace_tokens(gen_tokenizer, ids)
            if identity:
                keep = np.flatnonzero(gspans[:, 1] > gspans[:, 0])  # tokens with text, in order
                seq = list(heads[i].ids) + ids[keep].tolist()
                wanted = len(heads[i].ids) + np.arange(len(keep))
                if ended[i]:
                    seq.append(end_id)
                    wanted = np.append(wanted, len(seq) - 1)
                seqs.append(seq)
                positions.append(wanted)
                plans.append((keep, whitespace, None))
            else:
                seqs.append(vins[i].ids)
                positions.append(np.append(vins[i].response, vins[i].end) if ended[i] else vins[i].response)
                plans.append((gspans, whitespace, text_to_response_bytes(texts[i], vins[i].spans)))
        logps = self.logprobs(seqs, positions, progress, rows)
        for k, (i, lp) in enumerate(zip(rows, logps)):
            spans_or_keep, whitespace, vspans = plans[i]
            n = len(whitespace)
            if ended[i]:  # the end-of-turn log-prob goes to the EOS position, the response's last
                lp, eos_logp = lp[:-1], lp[-1]
            if vspans is None:  # identity alignment: position keep[k] gets the k-th log-prob
                valid = np.zeros(n, bool)
                valid[spans_or_keep] = True
                aligned = np.zeros(n)
                aligned[spans_or_keep] = lp
                if self.mask_whitespace:
                    valid &= ~whitespace
                aligned[~valid] = 0.0
            else:
                aligned, valid = align_logprobs(spans_or_keep, vspans, lp, whitespace, self.mask_whitespace)
            if ended[i]:
                aligned[n - 1], valid[n - 1] = eos_logp, True
            rewards[k, :n] = torch.from_numpy(aligned).float()
            mask[k, :n] = torch.from_numpy(valid)
        return rewards, mask


def _shared_values(forward, ids: Sequence[Sequence[int]], positions: Sequence[np.ndarray],
                   rows: Sequence[int]) -> dict:
    """One value per shared context (module docstring, item 6).

    A node is (ids[:p+1]) for a wanted position p; it is shared when two or more sequences agree on
    ids[:p+1]. In lexicographic order the sequences sharing a node are contiguous, so the node belongs
    to the first of them: its value comes from a forward of that sequence's shared prefix alone, up to
    the last shared position any sequence wants (rows or not, so the forward is the same whichever
    rows a call scores). forward: callable(ids, positions) -> values, the batched forward (each call
    here is one sequence). rows: the sequences whose values are wanted.
    Returns {b: (indices into positions[b], values)} for the rows that have shared positions.
    """
    arrays = [np.asarray(x, dtype=np.int64) for x in ids]
    order = sorted(range(len(ids)), key=lambda b: list(ids[b]))
    lcp = np.zeros(len(order) + 1, np.int64)  # lcp[k]: common prefix of sorted k-1 and k (0 at the ends)
    for k in range(1, len(order)):
        a, b = arrays[order[k - 1]], arrays[order[k]]
        n = min(len(a), len(b))
        diff = np.flatnonzero(a[:n] != b[:n])
        lcp[k] = diff[0] if len(diff) else n
    owner: list = []  # owner[k][p]: sorted index of the sequence whose forward scores node p of sorted k
    jobs: dict = {}   # sorted index -> positions its shared-prefix forward must score
    reads = []        # (b, indices into positions[b], owners, positions)
    for k, b in enumerate(order):
        depth = max(lcp[k], lcp[k + 1])  # positions < depth are shared with a neighbour
        own = np.full(depth, k, np.int64)
        shared_with_prev = min(lcp[k], depth)
        if shared_with_prev:
            own[:shared_with_prev] = owner[k - 1][:shared_with_prev]
        owner.append(own)
        where = np.flatnonzero(positions[b] < depth)
        if len(where):
            p = positions[b][where]
            reads.append((b, where, own[p], p))
            for j in np.unique(own[p]):
                jobs.setdefault(int(j), set()).update(p[own[p] == j].tolist())
    rows = set(rows)
    reads = [read for read in reads if read[0] in rows]
    needed = {int(j) for read in reads for j in np.unique(read[2])}
    values = {}
    for j, wanted in jobs.items():
        if j not in needed:
            continue
        wanted = np.array(sorted(wanted), np.int64)
        seq = arrays[order[j]][:wanted[-1] + 1]          # the shared prefix alone: batch of one, no padding
        values[j] = dict(zip(wanted.tolist(), forward([seq.tolist()], [wanted])[0]))
    return {b: (where, np.array([values[j][q] for j, q in zip(owners.tolist(), p.tolist())]))
            for b, where, owners, p in reads}
