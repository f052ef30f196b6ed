"""Sampling from a causal LM: the generator's input, its stop tokens, and its responses, sampled for
training (Section 2, Appendix E) or greedy for evaluation and local judges (Appendix E).

    model, tok, shipped, stop = load_generator("Qwen/Qwen2.5-0.5B", torch.device("cuda"))
    rollout = sample(model, tok, prompts, group_size=8, eos_ids=stop, device=model.device)   # G per prompt
    for batch in greedy_generate(model, tok, prompts, max_new_tokens=2048, eos_ids=stop): ...

Everything that turns a prompt into a response lives here, so training, evaluation and the judge
sample the same way. Readings of the paper:
  1. The prompt goes through the generator's chat template (add_generation_prompt); a base model with
     no template gets `bos_token + reward.PLAIN_TEMPLATE`, the format the verifier uses for such models.
     A system prompt: the template's own by default, or text, or "" for none (`chat_prefix`).
  2. A response ends at the first stop token: the union of the generation config's EOS, the
     tokenizer's EOS and the template's end of turn (`stop_token_ids`). Qwen2.5 *base* ships EOS
     <|endoftext|> while its template ends a turn with <|im_end|>.
  3. Sampling uses exactly the values given (Appendix E: temperature 1, top-p 1, 2,048 new tokens):
     the checkpoint's own generation_config (Qwen2.5 Instruct ships temperature 0.7, top-p 0.8, top-k
     20, repetition penalty 1.05) is set aside at load (`load_generator`), and top-k is disabled.
     Greedy means greedy: none of those processors either.
  4. fp32 master weights run under bf16 autocast on CUDA (`autocast`); `--rollout-dtype bf16` samples
     from a bf16 copy of the policy instead (`rollout_model`).

Shape letters: B responses (prompts x G), T response tokens, P prompt tokens (left-padded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from align import decode_response, token_bytes
from reward import PLAIN_TEMPLATE, load_causal_lm, turn_end


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# --- the generator and its stop tokens -----------------------------------------------------------------

def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """Ids that end a response: the union of the generation config's EOS, the tokenizer's EOS and the
    chat template's end-of-turn token. Qwen2.5 *base* ships EOS <|endoftext|> while its template ends
    a turn with <|im_end|>: stopping on EOS alone lets a base model run on into invented turns.
    """
    eos = generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    end = turn_end(tokenizer)  # without a template, the tokenizer's EOS: already in the list
    for extra in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end) if end else None):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def load_generator(name: str, device, trust_remote_code: bool = False, dtype: torch.dtype | None = torch.float32):
    """The generator, by default in fp32 master weights (bf16 autocast on GPU), with its shipped sampling
    defaults set aside so they cannot leak into rollouts (dtype None: bf16 on CUDA, for inference).

    Returns (model, tokenizer, shipped GenerationConfig (restored in saved checkpoints), stop ids: the
    union of EOS ids and the chat template's end of turn, see `stop_token_ids`).
    """
    from transformers import GenerationConfig

    model, tok = load_causal_lm(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    shipped = model.generation_config
    model.generation_config = GenerationConfig()
    stop = stop_token_ids(tok, shipped)
    if not stop:
        raise ValueError(f"generator {name!r} has no EOS token: its responses could never end")
    return model, tok, shipped, stop


# --- the input: chat prefix, padding, the context --------------------------------------------------------

_SYSTEM_MARK = "<<CME-GRPO-SYSTEM-7f3a>>"


def chat_prefix(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The generator's input text for a prompt: its chat template, or the plain format.

    system_prompt: None keeps the template's behaviour (Qwen2.5 and SmolLM2 inject a default system
    prompt, as TRL does); text becomes a system turn; "" means no system text: it removes a default the
    template injects (an empty system turn is the only way these templates allow) and otherwise adds
    nothing. A model without a chat template has no system turn; text is then put before the prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        head = f"{system_prompt}\n\n" if system_prompt else ""
        return (tokenizer.bos_token or "") + PLAIN_TEMPLATE.format(prompt=head + prompt)

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    user = [{"role": "user", "content": prompt}]
    if system_prompt is None:
        return render(user)
    if system_prompt:
        return render([{"role": "system", "content": system_prompt}] + user)
    plain, marked = render(user), render([{"role": "system", "content": _SYSTEM_MARK}] + user)
    before, _, after = marked.partition(_SYSTEM_MARK)
    injects_default = (len(plain) > len(before) + len(after) and plain.startswith(before)
                       and plain.endswith(after))
    return before + after if injects_default else plain


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows left-padded to one length, for generate(): (ids (b, P) int64, attention mask (b, P))."""
    P = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=device)
    attn = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, attn


def rendered_lengths(model, tokenizer, prompts: list[str], max_new_tokens: int, system_prompt: str | None,
                     who: str = "generator") -> tuple[int | None, list[int]]:
    """(the model's context in tokens, or None if its config names none; each prompt's length in tokens
    after the chat template). Refuses a max_new_tokens that leaves no room for any prompt."""
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    context = getattr(text_cfg, "max_position_embeddings", None)
    if context is not None and max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the {who}'s context is {context} tokens, "
                         "prompt included")
    rendered = [chat_prefix(tokenizer, p, system_prompt) for p in prompts]
    return context, [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(rendered, add_special_tokens=False)]


# --- sampled rollouts (training) -------------------------------------------------------------------------

def sampling_config(eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                    max_new_tokens: int = 2048, static_cache: bool = False, compile_decode: bool = False):
    """A GenerationConfig with every sampling knob set to the given value (nothing from the checkpoint).

    static_cache preallocates the KV cache (prompt + max_new_tokens) instead of growing it every step;
    on a GPU transformers then compiles the decode step unless told not to, which only compile_decode
    allows. Greedy outputs equal the dynamic cache's (tested on CPU)."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                            min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                            cache_implementation="static" if static_cache else None,
                            disable_compile=not compile_decode)


@dataclass
class Rollout:
    """G responses to each of the step's prompts.

    prompts: B strings (each prompt repeated G times, groups contiguous).
    prompt_ids: B lists of generator ids of the prompt prefix.
    response: (B, T) int64 sampled ids, padded. mask: (B, T) bool, tokens up to and including EOS.
    truncated: (B,) bool, no EOS within max_new_tokens. texts: B response texts (what the verifier reads).
    """
    prompts: list
    prompt_ids: list
    response: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    texts: list


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], group_size: int, eos_ids: list[int], device,
           temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 2048,
           system_prompt: str | None = None, batch_size: int = 128, static_cache: bool = False,
           compile_decode: bool = False, cut_short=None) -> Rollout:
    """Sample group_size responses to each prompt, batch_size rows per generate() call, left-padded.

    prompts: user prompts (rendered with `chat_prefix(tokenizer, p, system_prompt)`); eos_ids: the stop
    ids (`stop_token_ids`); the sampling values as in `sampling_config`. Draws from torch's global RNG.
    cut_short: optional callable () -> bool, checked after every decoding step; when it says True the
    responses end where they are (a run that was asked to stop drops such a rollout).
    """
    rows = [p for p in prompts for _ in range(group_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    gen_cfg = sampling_config(eos_ids, pad, temperature, top_p, max_new_tokens, static_cache, compile_decode)
    prompt_ids = [tokenizer(chat_prefix(tokenizer, p, system_prompt), add_special_tokens=False).input_ids
                  for p in rows]
    criteria = None
    if cut_short is not None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class CutShort(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), bool(cut_short()), dtype=torch.bool, device=input_ids.device)
        criteria = StoppingCriteriaList([CutShort()])
    responses = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        x, attn = left_pad(prompt_ids[i:i + batch_size], pad, device)
        with autocast(device):
            out = model.generate(input_ids=x, attention_mask=attn, generation_config=gen_cfg,
                                 stopping_criteria=criteria)
        responses.extend(out[:, x.shape[1]:].cpu())
    T = max(r.shape[0] for r in responses)
    response = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    truncated = torch.zeros(len(rows), dtype=torch.bool)
    eos = torch.tensor(eos_ids)
    for b, r in enumerate(responses):
        hits = torch.isin(r, eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else r.shape[0]  # keep the EOS: the policy learns to stop
        truncated[b] = not len(hits)
        response[b, :n] = r[:n]
        mask[b, :n] = True
    texts = [decode_response(token_bytes(tokenizer, response[b, :int(mask[b].sum())].numpy())).text
             for b in range(len(rows))]
    return Rollout(rows, prompt_ids, response, mask, truncated, texts)


def rollout_model(model, rollout_dtype: str = "fp32"):
    """The model rollouts are sampled from: the policy itself ("fp32"), or ("bf16") a frozen bf16 copy
    (no per-step weight casts under autocast), which `refresh_rollout_model` keeps equal to the
    policy's weights rounded to bf16. It samples from that rounding of the policy; the update treats the
    rollouts as on-policy (rho = 1), the mismatch every trainer with a separate inference engine accepts."""
    if rollout_dtype == "fp32":
        return model
    import copy
    return copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)


@torch.no_grad()
def refresh_rollout_model(rollout_copy, model) -> None:
    """Copy the policy's weights into its rollout copy (a no-op when they are the same model)."""
    if rollout_copy is not model:
        for a, b in zip(rollout_copy.parameters(), model.parameters()):
            a.copy_(b)


# --- greedy outputs (evaluation, local judges) ------------------------------------------------------------

def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, eos_ids: list[int],
                    batch_size: int = 8, progress: bool = False, system_prompt: str | None = None
                    ) -> Iterator[list[dict]]:
    """Greedy responses to user prompts, a batch at a time (yields per batch, for writing as it goes).

    prompts: strings, each rendered with `chat_prefix` (reward.PLAIN_TEMPLATE without a template).
    eos_ids: the stop ids (`stop_token_ids`: EOS and the template's turn end).
    system_prompt: as `chat_prefix` (None: the template's own default).
    Prompts are processed longest first (little left padding per batch). Yields, per batch, dicts
    {position (in prompts), output (text before EOS), tokens (generated ids before EOS), truncated
    (no EOS within max_new_tokens)}.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                              pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0)
    ids = [tokenizer(chat_prefix(tokenizer, p, system_prompt), add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt")
    model.eval()
    eos = torch.tensor(eos_ids)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        x, attn = left_pad([ids[i] for i in batch], pad, device)
        P = x.shape[1]
        with torch.no_grad(), autocast(device):  # bf16 autocast on CUDA
            out = model.generate(input_ids=x, attention_mask=attn, generation_config=config)
        results = []
        for row, i in enumerate(batch):
            r = out[row, P:].cpu()
            hits = torch.isin(r, eos).nonzero()
            n = int(hits[0]) if len(hits) else r.shape[0]
            text = decode_response(token_bytes(tokenizer, r[:n].numpy())).text
            results.append({"position": i, "output": text, "tokens": n, "truncated": not len(hits)})
        if bar:
            bar.update(len(batch))
        yield results
    if bar:
        bar.close()
