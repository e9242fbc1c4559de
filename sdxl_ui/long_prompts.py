"""Prompts longer than the text encoders' window, chunked as AUTOMATIC1111 does instead of cut: the tokens in chunks
of (window − 2), each with its own start and end token and padded to the window, encoded separately by both SDXL
text encoders and concatenated along the sequence; the pooled embedding from the first chunk (A1111's); the
negative prompt padded to the same number of chunks. A prompt within the window goes to diffusers as text, as
before (the same picture, bit for bit).

SDXL's window is 77 tokens (75 per chunk); the demo model's encoders read 32 (30 per chunk)."""
from __future__ import annotations

from .schema import LogLevel

MAX_CHUNKS = 8  # 8 × 75 = 600 tokens for SDXL; beyond it the rest is cut, and the log says so


def token_count(pipe, text: str) -> int:
    """The prompt's tokens without the start and end tokens, by the first tokenizer the pipeline has."""
    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    return len(tokenizer(text or "", add_special_tokens=False, truncation=False).input_ids)


def chunks_needed(pipe, prompt: str, negative: str) -> int:
    """How many chunks the longer of the two needs (1: both fit the window)."""
    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    per = tokenizer.model_max_length - 2
    return max(1, -(-max(token_count(pipe, prompt), token_count(pipe, negative)) // per))


def _chunk_ids(tokenizer, text: str, n: int) -> list[list[int]]:
    window = tokenizer.model_max_length
    per = window - 2
    ids = tokenizer(text or "", add_special_tokens=False, truncation=False).input_ids[: per * n]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for k in range(n):
        part = [tokenizer.bos_token_id, *ids[k * per:(k + 1) * per], tokenizer.eos_token_id]
        out.append(part + [pad] * (window - len(part)))
    return out


def _encode(pipe, text: str, n: int, clip_skip: int):
    """(sequence embeddings of n chunks, the pooled embedding of the first chunk) of one text, as diffusers'
    encode_prompt computes each chunk (penultimate hidden state, or clip_skip more)."""
    import torch

    pairs = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
             if t is not None and e is not None]
    per_encoder, pooled = [], None
    for tokenizer, encoder in pairs:
        ids = torch.tensor(_chunk_ids(tokenizer, text, n), device=pipe._execution_device)  # as encode_prompt
        out = encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 2)]  # (n, window, width)
        per_encoder.append(hidden.reshape(1, -1, hidden.shape[-1]))
        pooled = out[0][:1]  # the last encoder's (text_encoder_2's projection), first chunk
    return torch.cat(per_encoder, dim=-1), pooled


def chunked_arguments(pipe, prompt: str, negative: str, clip_skip: int = 0) -> tuple[dict, int]:
    """(the pipeline call's prompt arguments, the number of chunks): text when both fit the window; else
    ``prompt_embeds`` and ``pooled_prompt_embeds`` (and the negative's, zeros for an empty negative where the
    model says so, as diffusers does) from chunks, both texts in the same number of chunks (at most MAX_CHUNKS)."""
    import torch

    n = chunks_needed(pipe, prompt, negative)
    clip_skip = usable_clip_skip(pipe, clip_skip)
    if n == 1:
        return {"prompt": prompt, "negative_prompt": negative or None,
                **({"clip_skip": clip_skip} if clip_skip else {})}, 1
    n = min(n, MAX_CHUNKS)
    dtype = next(pipe.text_encoder_2.parameters()).dtype
    with torch.inference_mode():
        embeds, pooled = _encode(pipe, prompt, n, clip_skip)
        if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = _encode(pipe, negative or "", n, 0)  # diffusers: no skip on it
    return {"prompt_embeds": embeds.to(dtype), "pooled_prompt_embeds": pooled.to(dtype),
            "negative_prompt_embeds": negative_embeds.to(dtype),
            "negative_pooled_prompt_embeds": negative_pooled.to(dtype)}, n


def usable_clip_skip(pipe, clip_skip: int) -> int:
    """``clip_skip`` within the text encoders' depth (the demo model's have 3 layers): at most layers − 2, since 0
    already reads the penultimate layer."""
    depths = [e.config.num_hidden_layers for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    return max(0, min([clip_skip, *[d - 2 for d in depths]]))


def chunk_lines(pipe, prompt: str, negative: str, n: int) -> list[tuple[str, LogLevel]]:
    """The log's (line, level) for prompts that needed chunks: how many tokens in how many chunks, and what is cut
    past MAX_CHUNKS."""
    if n == 1:
        return []
    per = (pipe.tokenizer or pipe.tokenizer_2).model_max_length - 2
    lines = []
    for field, text in (("prompt", prompt), ("negative_prompt", negative)):
        tokens = token_count(pipe, text)
        if tokens > per * MAX_CHUNKS:
            lines.append((f"⚠ {field}: {tokens} tokens; {MAX_CHUNKS} chunks of {per} read, the rest cut",
                          LogLevel.WARNING))
        elif tokens:
            lines.append((f"{field}: {tokens} tokens, in {n} chunks of {per} (the encoders' window is {per + 2})",
                          LogLevel.INFO))
    return lines
