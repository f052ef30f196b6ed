"""Character-overlap token alignment: Appendix B of the CME-GRPO paper.

The token-level reward of Eq. (1) needs the verifier's log-probabilities on the *generator's* tokens.
Appendix B distributes each verifier token v_s over the generator tokens g_t it overlaps:

    w[t, s] = |span(v_s) ∩ span(g_t)| / |span(v_s)|           (Appendix B)
    aligned[t] = sum_s w[t, s] * log p_verifier(v_s | x, v_<s)   (Appendix B, the aligned Eq. 1 term)

Departures from the paper's wording, and why:
  1. Spans are measured in **bytes** of the response's UTF-8, not characters. Byte-level BPE tokens can
     hold part of a character (emoji, CJK); in character coordinates all the pieces get the same span
     and the weights stop summing to one. In bytes every token has an exact span.
  2. The response's bytes are the concatenation of the sampled tokens' exact byte contents, read off the
     vocabulary (linear time, no prefix decoding). The text the verifier sees is those bytes decoded
     with invalid UTF-8 replaced by U+FFFD; `text_to_response_bytes` maps text bytes back, monotonically.
  3. Masking. The paper masks (a) generator tokens with no overlapping verifier token (special tokens,
     EOS: zero width) and (b) whitespace-only generator tokens. (b) contradicts "the aligned values sum
     to the total verifier log-likelihood": a verifier token overlapping a whitespace token loses that
     share (ALIGNMENT-NOTES item 10). Which invariant holds in which mode:
       - mask_whitespace=True (paper, default): every unmasked position carries exactly
         sum_s w[t, s] logp_s; masked positions are 0. The sum over positions is the verifier total
         minus the share that fell on whitespace tokens.
       - mask_whitespace=False: only zero-width tokens are masked, and sum_t aligned[t] equals the
         verifier total sum_s logp_s over the verifier tokens that hold response bytes.
  4. The verifier's tokens of a response are those holding at least one response byte, their spans
     clipped to the response and tiled over it (`tile_spans`): a token straddling the prompt/response
     boundary counts with its response part; a token holding only an inserted space (SentencePiece
     dummy prefix) holds no response byte and is left out; bytes no verifier token claims (a
     normaliser composed them away) go to the token before them.
  5. Known rough edges, both rare: where a normaliser changed the text (Qwen's NFC on non-NFC input),
     verifier spans come from the tokenizer's character offsets, so pieces of one split character can
     get zero width and drop out of the response's verifier tokens; and a verifier token lying wholly
     inside a U+FFFD (invalid UTF-8 from sampling) maps to zero response bytes.

Run `python align.py` for the paper's worked example.
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "UnsupportedTokenizerError", "VocabBytes", "vocab_bytes", "token_byte_spans", "token_bytes",
    "whitespace_tokens", "decode_response", "text_to_response_bytes", "encoding_byte_spans",
    "tile_spans", "Weights", "overlap_weights", "align_logprobs",
]

# Shape letters: T generator tokens, S verifier tokens, N non-zero entries of the weight matrix.


class UnsupportedTokenizerError(ValueError):
    """The tokenizer's decoder is not one whose token bytes can be read off the vocabulary."""


# --- per-tokenizer byte table ------------------------------------------------------------------------

def _gpt2_unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class VocabBytes:
    """What a tokenizer's decoder makes of each id, built once per tokenizer (`vocab_bytes`).

    pieces:     list of V bytes objects, the exact bytes of each id ("" for special tokens)
    lengths:    (V,) int64, len(pieces[i])
    special:    (V,) bool, special tokens: skipped by the decoder, zero width
    added:      (V,) bool, added tokens (special or not): encoding splits the text around them
    whitespace: (V,) bool, pieces that are non-empty and all whitespace
    first_drop: (V,) int64, bytes the decoder drops when the id is the first token (Metaspace decoders
                drop every '▁' of token 0); zeros otherwise
    strip_spaces: how many leading spaces a `Strip` decoder removes from the decoded string (Llama-2)
    kind:       "byte-level" or "sentencepiece", for messages
    """
    pieces: list
    lengths: np.ndarray
    special: np.ndarray
    added: np.ndarray
    whitespace: np.ndarray
    first_drop: np.ndarray
    strip_spaces: int
    kind: str


def _decoder_rules(decoder: dict | None) -> tuple[str, str | None, int]:
    """Read a tokenizer.json `decoder` into (kind, space_marker, strip_spaces); raise if unsupported."""
    if decoder is None:
        raise UnsupportedTokenizerError(
            "tokenizer has no decoder (tokens would be joined with spaces); only byte-level BPE and "
            "SentencePiece-style BPE decoders are supported")
    steps = decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]
    kinds = [d["type"] for d in steps]
    if kinds == ["ByteLevel"]:
        return "byte-level", None, 0
    marker, strip, metaspace = None, 0, False
    for d in steps:
        t = d["type"]
        if t == "Replace" and d["pattern"].get("String") == "\u2581" and d["content"] == " ":
            marker = "\u2581"
        elif t in ("ByteFallback", "Fuse"):
            pass
        elif t == "Strip" and d["content"] == " " and d.get("stop", 0) == 0:
            strip = int(d["start"])
        elif t == "Metaspace" and d.get("prepend_scheme", "always") != "never":
            marker, metaspace = d["replacement"], True
        elif t == "Metaspace":
            marker = d["replacement"]
        else:
            raise UnsupportedTokenizerError(
                f"unsupported decoder step {json.dumps(d)} in decoder pipeline {kinds}; supported: "
                "ByteLevel, or Replace('\u2581'->' ') / Metaspace with ByteFallback, Fuse, Strip")
    if marker is None:
        raise UnsupportedTokenizerError(f"decoder pipeline {kinds} has no '\u2581'->' ' rule")
    if metaspace and strip:
        raise UnsupportedTokenizerError(f"decoder pipeline {kinds} mixes Metaspace and Strip")
    return ("sentencepiece-metaspace" if metaspace else "sentencepiece"), marker, strip


def _build_vocab_bytes(tokenizer) -> VocabBytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; load it with "
            "AutoTokenizer.from_pretrained(...) so it has a tokenizer.json")
    kind, marker, strip = _decoder_rules(json.loads(backend.decoder.__getstate__())
                                         if backend.decoder is not None else None)
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    size = max(vocab.values()) + 1
    pieces: list = [b""] * size
    special = np.zeros(size, bool)
    is_added = np.zeros(size, bool)
    is_added[list(added)] = True
    first_drop = np.zeros(size, np.int64)
    u2b = _gpt2_unicode_to_bytes()
    for tok, i in vocab.items():
        if i in added and added[i].special:
            special[i] = True
            continue
        if kind == "byte-level":
            try:
                pieces[i] = bytes([u2b[c] for c in tok])
            except KeyError:  # the decoder keeps text with non byte-level characters as is
                pieces[i] = tok.encode("utf-8")
        else:
            m = _BYTE_FALLBACK.match(tok)
            if m and i not in added:
                pieces[i] = bytes([int(m.group(1), 16)])
            else:
                pieces[i] = tok.replace(marker, " ").encode("utf-8")
                if kind == "sentencepiece-metaspace":
                    first_drop[i] = tok.count(marker)
    lengths = np.fromiter((len(p) for p in pieces), np.int64, size)
    whitespace = np.zeros(size, bool)
    for i, p in enumerate(pieces):
        if p and p.isascii() and p.isspace():
            whitespace[i] = True
        elif p and not p.isascii():
            try:
                whitespace[i] = p.decode("utf-8").isspace()
            except UnicodeDecodeError:
                pass
    return VocabBytes(pieces, lengths, special, is_added, whitespace, first_drop, strip, kind)


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocab_bytes(tokenizer) -> VocabBytes:
    """The byte table of `tokenizer` (a transformers fast tokenizer), built on first use and cached.

    Building it reads every vocabulary entry once (about half a second for 150k tokens); every later
    call is a dictionary lookup. The cache is rebuilt if tokens are added to the tokenizer.
    """
    hit = _CACHE.get(tokenizer)
    if hit is None or hit[0] != len(tokenizer):
        hit = (len(tokenizer), _build_vocab_bytes(tokenizer))
        _CACHE[tokenizer] = hit
    return hit[1]


# --- spans of sampled ids ----------------------------------------------------------------------------

def _lengths(table: VocabBytes, ids: np.ndarray) -> np.ndarray:
    """(T,) int64 byte length of each token of a decoded sequence, decoder position rules applied."""
    if ids.size and ids.min() < 0:
        raise ValueError(f"negative token id {int(ids.min())}")
    inside = ids < len(table.pieces)  # ids past the tokenizer (padding rows of the embedding): no text
    lengths = np.where(inside, table.lengths[np.where(inside, ids, 0)], 0)
    nz = np.flatnonzero(lengths)
    if nz.size == 0:
        return lengths
    first = nz[0]
    lengths[first] -= table.first_drop[ids[first]]  # Metaspace: token 0 loses its '▁'
    left = table.strip_spaces  # Strip: leading spaces of the fused string, possibly over several tokens
    for i in nz:
        if left == 0:
            break
        piece = table.pieces[ids[i]]
        lead = len(piece) - len(piece.lstrip(b" "))
        take = min(lead, left)
        lengths[i] -= take
        left -= take
        if take < len(piece):
            break
    return lengths


def token_byte_spans(tokenizer, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """[start, end) byte offsets of each sampled token within the response's bytes.

    tokenizer: a transformers fast tokenizer (byte-level BPE or SentencePiece-style BPE).
    ids: (T,) ints, the token ids as sampled (EOS, padding rows, anything).
    Returns (T, 2) int64. The response's bytes are `token_bytes(tokenizer, ids)`: what the tokenizer's
    own decoder produces with skip_special_tokens=True and no clean-up, before any UTF-8 repair.
    Special tokens and ids without text have zero width. Linear time.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    lengths = _lengths(vocab_bytes(tokenizer), ids)
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], axis=1)


def token_bytes(tokenizer, ids: Sequence[int] | np.ndarray) -> bytes:
    """The response's exact bytes: the sampled tokens' bytes concatenated, decoder rules applied.

    ids: (T,) ints. `token_byte_spans` indexes into this string.
    """
    table = vocab_bytes(tokenizer)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    lengths = _lengths(table, ids)
    nz = np.flatnonzero(lengths)
    if nz.size == 0:
        return b""
    # position rules only touch the first tokens: Strip removes leading bytes, Metaspace its '▁'s
    head = []
    for i in nz:
        piece = table.pieces[ids[i]]
        if i == nz[0] and table.first_drop[ids[i]]:
            piece = piece.replace(b" ", b"", int(table.first_drop[ids[i]]))
        piece = piece[len(piece) - lengths[i]:]
        head.append(piece)
        if len(piece) == table.lengths[ids[i]]:
            break
    rest = ids[nz[len(head):]].tolist()
    return b"".join(head) + b"".join(map(table.pieces.__getitem__, rest))


def whitespace_tokens(tokenizer, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """(T,) bool: which sampled tokens decode to whitespace only (masked by the paper's Appendix B)."""
    table = vocab_bytes(tokenizer)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    inside = ids < len(table.pieces)
    return inside & table.whitespace[np.where(inside, ids, 0)]


# --- response text and its byte map ------------------------------------------------------------------

class ResponseText(NamedTuple):
    """The text a verifier sees for a response, and how its UTF-8 bytes map to the response's bytes.

    text: the response bytes decoded as UTF-8, each maximal invalid subsequence replaced by U+FFFD.
    anchors_text, anchors_bytes: (K,) int64, matching positions (text bytes, response bytes) between
        which the map is a shift; a U+FFFD (3 text bytes) stands for 1-3 response bytes.
    """
    text: str
    anchors_text: np.ndarray
    anchors_bytes: np.ndarray


def decode_response(data: bytes) -> ResponseText:
    """Decode a response's bytes to text, remembering where invalid UTF-8 was replaced."""
    parts, at, ab, pos = [], [0], [0], 0
    while True:
        try:
            parts.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            parts.append(data[pos:pos + e.start].decode("utf-8"))
            parts.append("\ufffd")
            tb = at[-1] + (pos + e.start - ab[-1])  # text bytes so far
            at += [tb, tb + 3]
            ab += [pos + e.start, pos + e.end]
            pos += e.end
    text = "".join(parts)
    at.append(at[-1] + (len(data) - ab[-1]))
    ab.append(len(data))
    return ResponseText(text, np.asarray(at, np.int64), np.asarray(ab, np.int64))


def text_to_response_bytes(rt: ResponseText, positions: np.ndarray) -> np.ndarray:
    """Map byte positions in rt.text's UTF-8 to positions in the response's bytes (monotone).

    positions: int64 array, any shape, values in [0, len(text.encode())]. A position inside a U+FFFD
    maps to the start of the bytes it replaced.
    """
    if len(rt.anchors_text) == 2:  # valid UTF-8: the identity
        return np.asarray(positions, np.int64)
    return np.floor(np.interp(positions, rt.anchors_text, rt.anchors_bytes) + 1e-9).astype(np.int64)


# --- spans of an encoding of a text --------------------------------------------------------------

def _char_to_byte(text: str) -> np.ndarray:
    """(len(text)+1,) int64: the UTF-8 byte offset of each character boundary."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(n, dtype=np.int64)])


def encoding_byte_spans(tokenizer, ids: Sequence[int], char_offsets: np.ndarray, text: str) -> np.ndarray:
    """Byte spans, in text.encode("utf-8"), of the tokens of an *encoding* of `text`.

    tokenizer: the fast tokenizer that encoded `text` into `ids` (S,) with `char_offsets` (S, 2).
    Exact when the tokens' bytes spell the text, possibly after an inserted prefix (SentencePiece's
    dummy space): spans are then cumulated token bytes, so pieces of one character get their own bytes.
    Otherwise (a normaliser changed the text, e.g. NFC) the tokenizer's character offsets are used,
    made monotone. Returns (S, 2) int64; tokens of inserted text have width 0 or start before 0.
    """
    raw = text.encode("utf-8")
    ids_a = np.asarray(ids, dtype=np.int64).reshape(-1)
    table = vocab_bytes(tokenizer)
    inside = ids_a < len(table.pieces)
    lengths = np.where(inside, table.lengths[np.where(inside, ids_a, 0)], 0)
    spelled = b"".join(map(table.pieces.__getitem__, ids_a[inside].tolist()))
    extra = len(spelled) - len(raw)
    if extra >= 0 and spelled.endswith(raw):
        ends = np.cumsum(lengths) - extra
        return np.stack([ends - lengths, ends], axis=1)
    c2b = _char_to_byte(text)
    spans = c2b[np.asarray(char_offsets, dtype=np.int64).reshape(-1, 2)]
    # a token sharing bytes with the one before it starts where that one ends
    prev_end = np.concatenate([[0], np.maximum.accumulate(spans[:-1, 1])])
    spans[:, 0] = np.maximum(spans[:, 0], prev_end)
    spans[:, 1] = np.maximum(spans[:, 1], spans[:, 0])
    return spans


def tile_spans(spans: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens holding bytes of [start, end), with spans shifted to it and tiling it.

    spans: (S, 2) int64 monotone byte spans (from `encoding_byte_spans`) in the coordinates of a string
        whose bytes [start, end) are the response.
    Returns (index (R,) int64 into the S tokens, tiled (R, 2) int64 spans in [0, end - start)): clipped
    to the response, tokens with no response byte dropped, gaps given to the token before them (the
    first token starts at 0, the last ends at end - start).
    """
    clipped = np.clip(spans, start, end) - start
    index = np.flatnonzero(clipped[:, 1] > clipped[:, 0])
    tiled = clipped[index].copy()
    if len(index):
        tiled[:-1, 1] = tiled[1:, 0]
        tiled[0, 0], tiled[-1, 1] = 0, end - start
    return index, tiled


# --- weights and aligned log-probabilities (Appendix B) ----------------------------------------------

class Weights(NamedTuple):
    """Sparse w[t, s] of Appendix B in coordinate form: w[t[k], s[k]] = w[k], every entry > 0."""
    t: np.ndarray  # (N,) int64 generator positions
    s: np.ndarray  # (N,) int64 verifier positions
    w: np.ndarray  # (N,) float64 weights
    shape: tuple[int, int]  # (T, S)

    def dense(self) -> np.ndarray:
        """(T, S) float64 matrix; for printing and tests (2,048 x 2,500 is 40 MB)."""
        out = np.zeros(self.shape)
        out[self.t, self.s] = self.w
        return out


def overlap_weights(gen_spans: np.ndarray, ver_spans: np.ndarray) -> Weights:
    """w[t, s] = |span(v_s) ∩ span(g_t)| / |span(v_s)| (Appendix B), sparse.

    gen_spans: (T, 2) int, generator token spans, sorted and non-overlapping (zero widths allowed).
    ver_spans: (S, 2) int, verifier token spans in the same byte coordinates, sorted, non-overlapping.
    Each verifier token overlaps a contiguous run of generator tokens, so the N non-zero entries number
    at most T + S and are found with two binary searches; no Python loop over tokens.
    Every verifier token of non-zero width whose bytes the generator spans cover gets sum_t w = 1.
    """
    g = np.asarray(gen_spans, dtype=np.int64).reshape(-1, 2)
    v = np.asarray(ver_spans, dtype=np.int64).reshape(-1, 2)
    for name, sp in (("gen_spans", g), ("ver_spans", v)):
        wide = sp[sp[:, 1] > sp[:, 0]]
        if (sp[:, 1] < sp[:, 0]).any() or (wide[1:, 0] < wide[:-1, 1]).any():
            raise ValueError(f"{name} must be sorted, non-overlapping [start, end) spans")
    gi = np.flatnonzero(g[:, 1] > g[:, 0])  # zero-width generator tokens overlap nothing
    gs = g[gi]
    width = v[:, 1] - v[:, 0]
    lo = np.searchsorted(gs[:, 1], v[:, 0], side="right")  # first generator token ending after v start
    hi = np.searchsorted(gs[:, 0], v[:, 1], side="left")   # one past the last starting before v end
    count = np.where(width > 0, np.maximum(hi - lo, 0), 0)
    s = np.repeat(np.arange(len(v)), count)
    t_local = np.repeat(lo, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    overlap = np.minimum(gs[t_local, 1], v[s, 1]) - np.maximum(gs[t_local, 0], v[s, 0])
    return Weights(gi[t_local], s, overlap / width[s], (len(g), len(v)))


def align_logprobs(gen_spans: np.ndarray, ver_spans: np.ndarray, ver_logprobs: np.ndarray,
                   gen_whitespace: np.ndarray, mask_whitespace: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Aligned verifier log-probabilities on the generator's tokens (Eq. 1 via Appendix B).

    gen_spans: (T, 2) int generator token spans; ver_spans: (S, 2) int verifier token spans, same bytes.
    ver_logprobs: (S,) float, log p_verifier(v_s | x, v_<s).
    gen_whitespace: (T,) bool, generator tokens that decode to whitespace only (`whitespace_tokens`).
    mask_whitespace: the paper's rule (default). See the module docstring, item 3, for which
        invariant holds in which mode.
    Returns (aligned (T,) float64, mask (T,) bool): aligned[t] = sum_s w[t, s] logp_s where mask[t],
    0 elsewhere; mask is False for tokens no verifier token overlaps and, when mask_whitespace, for
    whitespace-only tokens.
    """
    W = overlap_weights(gen_spans, ver_spans)
    T = W.shape[0]
    logp = np.asarray(ver_logprobs, dtype=np.float64).reshape(-1)
    aligned = np.bincount(W.t, weights=W.w * logp[W.s], minlength=T)  # Appendix B: sum_s w[t,s] logp_s
    mask = np.bincount(W.t, minlength=T) > 0
    if mask_whitespace:
        mask &= ~np.asarray(gen_whitespace, dtype=bool)
    return np.where(mask, aligned, 0.0), mask


def _worked_example() -> None:
    """Appendix B's example: "unhappiness", generator ["un", "happiness"], verifier ["unhappy", "ness"]."""
    gen = np.array([[0, 2], [2, 11]])
    ver = np.array([[0, 7], [7, 11]])  # the paper's spans (its verifier strings do not spell the word)
    logp = np.array([-2.1, -0.7])  # illustrative verifier log-probabilities
    W = overlap_weights(gen, ver).dense()
    aligned, mask = align_logprobs(gen, ver, logp, np.zeros(2, bool))
    print('response "unhappiness"; w[t, s] = |span(v_s) ∩ span(g_t)| / |span(v_s)|\n')
    print(f"{'generator token':<18}{'span':<9}{'w[t, unhappy]':>14}{'w[t, ness]':>12}{'aligned logp':>14}")
    for t, name in enumerate(["un", "happiness"]):
        print(f"{name!r:<18}{str(tuple(gen[t].tolist())):<9}{W[t, 0]:>14.4f}{W[t, 1]:>12.4f}{aligned[t]:>14.4f}")
    print(f"\nverifier: 'unhappy' [0, 7) logp {logp[0]}, 'ness' [7, 11) logp {logp[1]}")
    print(f"2/7 = {2/7:.4f}, 5/7 = {5/7:.4f}; sum_t w[t, s] = {W.sum(0)}; "
          f"sum of aligned = {aligned.sum():.4f} = total verifier logp {logp.sum():.4f}")


if __name__ == "__main__":
    _worked_example()
    # Expected output:
    # response "unhappiness"; w[t, s] = |span(v_s) ∩ span(g_t)| / |span(v_s)|
    #
    # generator token   span      w[t, unhappy]  w[t, ness]  aligned logp
    # 'un'              (0, 2)           0.2857      0.0000       -0.6000
    # 'happiness'       (2, 11)          0.7143      1.0000       -2.2000
    #
    # verifier: 'unhappy' [0, 7) logp -2.1, 'ness' [7, 11) logp -0.7
    # 2/7 = 0.2857, 5/7 = 0.7143; sum_t w[t, s] = [1. 1.]; sum of aligned = -2.8000 = total verifier logp -2.8000
