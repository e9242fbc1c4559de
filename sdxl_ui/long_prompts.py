"""Prompts as A1111 conditions on them: emphasis, BREAK, chunks beyond the encoders' window, and prompt editing.

The prompt is parsed once (``prompt_syntax``). A prompt of plain words within the window goes to diffusers as text,
as before (the same picture, bit for bit: ``(x:1.0)`` is plain ``x``). Otherwise, as A1111's
``FrozenCLIPEmbedderWithCustomWords`` does it:
- each fragment is tokenized on its own and the tokens go into chunks of (window − 2): a ``BREAK`` ends the chunk,
  and a chunk that fills up within 20 tokens after a comma moves the tokens after the comma to the next chunk
  (A1111's default ``comma_padding_backtrack``); each chunk gets its start and end token and is padded to the window;
- both SDXL text encoders encode each chunk (the penultimate hidden state, or ``clip_skip`` more); the emphasis
  multiplies each token's embedding by its weight and restores the chunk's original mean (A1111's
  ``EmphasisOriginal``); the chunks are concatenated along the sequence; the pooled embedding is the first chunk's;
- the negative prompt goes through the same and is padded to the same number of chunks (at most ``MAX_CHUNKS``);
- a schedule (``[from:to:when]``, ``[a|b]``) encodes each phase and ``prompt_schedule()`` swaps the conditioning at
  the phase's first step through the pipeline's step-end callback (after the guidance interval's, so a halved batch
  gets the conditional rows alone).

SDXL's window is 77 tokens (75 per chunk); the demo model's encoders read 32 (30 per chunk)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .prompt_syntax import Fragment, ParsedPrompt, parse
from .schema import LogLevel

MAX_CHUNKS = 8  # 8 × 75 = 600 tokens for SDXL; beyond it the rest is cut, and the log says so
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunks(tokenizer, fragments: tuple[Fragment, ...]) -> list[Chunk]:
    """The fragments' tokens in chunks of at most (window − 2), without start, end or padding (A1111's
    ``tokenize_line``): BREAK ends a chunk, a full chunk within COMMA_BACKTRACK tokens of a comma breaks after it."""
    per = tokenizer.model_max_length - 2
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    out, chunk, last_comma = [], Chunk(), -1
    for fragment in fragments:
        if fragment.is_break:
            out.append(chunk)
            chunk, last_comma = Chunk(), -1
            continue
        for token in tokenizer(fragment.text, add_special_tokens=False, truncation=False).input_ids:
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == per and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                out.append(Chunk(chunk.tokens[:cut], chunk.weights[:cut]))
                chunk, last_comma = Chunk(chunk.tokens[cut:], chunk.weights[cut:]), -1
            if len(chunk.tokens) == per:
                out.append(chunk)
                chunk, last_comma = Chunk(), -1
            chunk.tokens.append(token)
            chunk.weights.append(fragment.weight)
    if chunk.tokens or not out:
        out.append(chunk)
    return out


def _padded(tokenizer, found: list[Chunk], n: int) -> tuple[list[list[int]], list[list[float]]]:
    """n chunks of the window: start, tokens, end, padding (diffusers' pad token); missing chunks empty."""
    window = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, weights = [], []
    for chunk in (found + [Chunk()] * n)[:n]:
        part = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
        ids.append(part + [pad] * (window - len(part)))
        weights.append([1.0, *chunk.weights, 1.0] + [1.0] * (window - len(part)))
    return ids, weights


def _pairs(pipe):
    return [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
            if t is not None and e is not None]


def chunk_count(pipe, fragments: tuple[Fragment, ...]) -> int:
    return max(len(chunks(tokenizer, fragments)) for tokenizer, _ in _pairs(pipe))


def _encode(pipe, fragments: tuple[Fragment, ...], n: int, clip_skip: int):
    """(sequence embeddings of n chunks, the pooled embedding of the first chunk) of one text, as diffusers'
    encode_prompt computes each chunk, with A1111's emphasis."""
    import torch

    per_encoder, pooled = [], None
    for tokenizer, encoder in _pairs(pipe):
        ids, weights = _padded(tokenizer, chunks(tokenizer, fragments), n)
        ids = torch.tensor(ids, device=pipe._execution_device)  # as encode_prompt
        out = encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 2)]  # (n, window, width)
        multipliers = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device)
        if bool((multipliers != 1.0).any()):  # EmphasisOriginal, per chunk: weight, then the original mean back
            mean = hidden.mean(dim=(1, 2), keepdim=True)
            hidden = hidden * multipliers.unsqueeze(-1)
            hidden = hidden * (mean / hidden.mean(dim=(1, 2), keepdim=True))
        per_encoder.append(hidden.reshape(1, -1, hidden.shape[-1]))
        pooled = out[0][:1]  # the last encoder's (text_encoder_2's projection), first chunk
    return torch.cat(per_encoder, dim=-1), pooled


@dataclass(frozen=True)
class Conditioning:
    """What a run's pipeline call gets for its prompts: ``arguments`` (text, or the first phase's embeddings), the
    number of chunks, the schedule's later phases, and the parsed prompts (for the log and the report)."""

    arguments: dict
    chunks: int
    prompt: ParsedPrompt
    negative: ParsedPrompt
    phases: tuple = ()  # ((first step index, prompt_embeds, pooled, negative_embeds, negative_pooled), …) after 0
    cut: bool = False  # more than MAX_CHUNKS: the rest is not read
    cut_note: str | None = None  # what was cut, for the PNG and the API's info ("Prompt cut")

    def schedule(self, then=None, switched: list | None = None):
        """The step-end callback that switches the conditioning at each phase (``then`` after it), or ``then``;
        ``switched`` collects the step indexes that got a new conditioning."""
        return prompt_schedule()(self.phases, then, switched) if self.phases else then

    def remember(self, pipe) -> "PromptState":
        """What the report reads back of this run's prompts: set on ``pipe``'s registry (``hooks.state``)."""
        from .optimizations import hooks

        state = PromptState(self.chunks, "prompt" in self.arguments, self.prompt.weights, self.prompt.breaks,
                            len(self.prompt.phases), self.prompt.steps, [], self.cut, tuple(p[0] for p in self.phases))
        hooks.set_state(pipe, "prompt", state)
        return state


@dataclass
class PromptState:
    """How the last run conditioned on its prompt (the report's "prompt handling" row reads ``summary``)."""

    chunks: int
    text: bool  # plain words within the window: given to diffusers as text
    weights: tuple[float, ...]
    breaks: int
    phases: int
    steps: int
    switched: list[int]  # step indexes whose conditioning the schedule switched (filled during the run)
    cut: bool
    planned: tuple[int, ...] = ()  # the step indexes where the schedule switches

    def summary(self) -> str:
        if self.text:
            return "last run: plain words within the encoders' window, given to the pipeline as text"
        parts = [f"{self.chunks} chunk{'s' if self.chunks > 1 else ''}" + (" (the rest cut)" if self.cut else "")]
        if self.weights:
            parts.append(f"weights {', '.join(f'{w:.3g}' for w in self.weights)}")
        if self.breaks:
            parts.append(f"{self.breaks} BREAK")
        if self.phases > 1:
            done = bool(self.switched)
            steps = ", ".join(str(i + 1) for i in (self.switched if done else self.planned))
            parts.append(f"{self.phases} phases over {self.steps} steps, {'switched' if done else 'switching'} at "
                         f"step {steps}")
        return "last run: " + "; ".join(parts)


def conditioning(pipe, prompt: str, negative: str, clip_skip: int = 0, steps: int = 1) -> Conditioning:
    """The prompt arguments of a run of ``steps`` steps: text when both prompts are plain words within the window;
    else embeddings from chunks with emphasis, both prompts in the same number of chunks; a schedule's phases."""
    import torch

    parsed, parsed_negative = parse(prompt or "", steps), parse(negative or "", steps)
    clip_skip = usable_clip_skip(pipe, clip_skip)
    texts = [p.fragments for p in (*parsed.phases, *parsed_negative.phases)]
    n = max(chunk_count(pipe, fragments) for fragments in texts)
    plain, plain_negative = parsed.plain, parsed_negative.plain
    if n == 1 and plain is not None and plain_negative is not None:
        return Conditioning({"prompt": plain, "negative_prompt": plain_negative or None,
                             **({"clip_skip": clip_skip} if clip_skip else {})}, 1, parsed, parsed_negative)
    cut, n = n > MAX_CHUNKS, min(n, MAX_CHUNKS)
    dtype = next(pipe.text_encoder_2.parameters()).dtype
    zeros = not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    starts = sorted({0, *[p.until + 1 for p in (*parsed.phases, *parsed_negative.phases) if p.until + 1 < steps]})
    encoded = []
    with torch.inference_mode():
        for start in starts:  # A1111: step index i takes the first phase with i <= its last step
            embeds, pooled = _encode(pipe, parsed.phase_at(start).fragments, n, clip_skip)
            if zeros:
                negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:  # diffusers: no clip skip on the negative
                negative_embeds, negative_pooled = _encode(pipe, parsed_negative.phase_at(start).fragments, n, 0)
            encoded.append((start, *(t.to(dtype) for t in (embeds, pooled, negative_embeds, negative_pooled))))
    _, embeds, pooled, negative_embeds, negative_pooled = encoded[0]
    return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                         "negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled},
                        n, parsed, parsed_negative, tuple(encoded[1:]), cut, _cut_note(pipe, parsed, parsed_negative)
                        if cut else None)


def _cut_note(pipe, *prompts: ParsedPrompt) -> str:
    per = (pipe.tokenizer or pipe.tokenizer_2).model_max_length - 2
    names = ("prompt", "negative prompt")
    return "; ".join(f"{name} {tokens} tokens, {MAX_CHUNKS * per} read ({MAX_CHUNKS} chunks of {per})"
                     for name, parsed in zip(names, prompts)
                     if (tokens := max(token_count(pipe, p.fragments) for p in parsed.phases)) > MAX_CHUNKS * per)


def chunked_arguments(pipe, prompt: str, negative: str, clip_skip: int = 0) -> tuple[dict, int]:
    """(the pipeline call's prompt arguments, the number of chunks) of a run's first step."""
    found = conditioning(pipe, prompt, negative, clip_skip)
    return found.arguments, found.chunks


@lru_cache(maxsize=1)
def prompt_schedule():
    """The ``PromptSchedule`` class (a diffusers ``PipelineCallback``, so the pipeline hands it the tensors it
    names; defined on first use: importing this module imports no diffusers)."""
    from diffusers.callbacks import PipelineCallback

    class PromptSchedule(PipelineCallback):
        """A step-end callback that switches the conditioning at each phase of a scheduled prompt: at the end of
        step i it sets the embeddings of step i + 1. With guidance the batch is [negative, prompt] (diffusers'
        order); after the guidance interval dropped the negative rows, the prompt's alone. ``then``: the callback
        called after it."""

        tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds"]

        def __init__(self, phases, then=None, switched: list | None = None):
            super().__init__()
            self.phases, self.then = {p[0]: p[1:] for p in phases}, then
            self.tensor_inputs = list(dict.fromkeys([*PromptSchedule.tensor_inputs,
                                                     *getattr(then, "tensor_inputs", [])]))
            self.switched = [] if switched is None else switched  # the step indexes given a new conditioning

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            import torch

            phase = self.phases.get(step_index + 1)
            if phase is not None:
                embeds, pooled, negative_embeds, negative_pooled = phase
                rows = callback_kwargs["latents"].shape[0]
                guided = callback_kwargs["prompt_embeds"].shape[0] == 2 * rows
                repeat = lambda t: t.repeat(rows, *([1] * (t.dim() - 1)))  # noqa: E731 - one prompt per image
                device = callback_kwargs["prompt_embeds"].device
                if guided:
                    embeds = torch.cat([repeat(negative_embeds), repeat(embeds)])
                    pooled = torch.cat([repeat(negative_pooled), repeat(pooled)])
                else:
                    embeds, pooled = repeat(embeds), repeat(pooled)
                callback_kwargs["prompt_embeds"] = embeds.to(device)
                callback_kwargs["add_text_embeds"] = pooled.to(device)
                self.switched.append(step_index + 1)
            if self.then is not None:
                callback_kwargs = self.then(pipeline, step_index, timestep, callback_kwargs)
            return callback_kwargs

    return PromptSchedule


def usable_clip_skip(pipe, clip_skip: int) -> int:
    """``clip_skip`` within the text encoders' depth (the demo model's have 3 layers): at most layers − 2, since 0
    already reads the penultimate layer."""
    depths = [e.config.num_hidden_layers for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    return max(0, min([clip_skip, *[d - 2 for d in depths]]))


def token_count(pipe, fragments: tuple[Fragment, ...]) -> int:
    """The text's tokens (without BREAKs, start and end tokens), by the first tokenizer the pipeline has."""
    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    return sum(len(c.tokens) for c in chunks(tokenizer, fragments))


def chunk_lines(pipe, found: Conditioning) -> list[tuple[str, LogLevel]]:
    """The log's (line, level) for prompts that needed more than text: chunks, weights, BREAKs, the schedule, and
    what is cut past MAX_CHUNKS."""
    if found.chunks == 1 and "prompt" in found.arguments:
        return []
    per = (pipe.tokenizer or pipe.tokenizer_2).model_max_length - 2
    lines = []
    for name, parsed in (("prompt", found.prompt), ("negative_prompt", found.negative)):
        need = max(chunk_count(pipe, p.fragments) for p in parsed.phases)
        tokens = max(token_count(pipe, p.fragments) for p in parsed.phases)
        extras = ", ".join(x for x in (
            f"weights {', '.join(f'{w:.3g}' for w in parsed.weights)}" if parsed.weights else "",
            f"{parsed.breaks} BREAK" if parsed.breaks else "",
            f"{len(parsed.phases)} phases over {parsed.steps} steps" if parsed.scheduled else "") if x)
        if need > MAX_CHUNKS:
            lines.append((f"⚠ {name}: {tokens} tokens; {MAX_CHUNKS} chunks of {per} read, the rest cut",
                          LogLevel.WARNING))
        elif tokens or extras:
            lines.append((f"{name}: {tokens} tokens, in {found.chunks} chunks of {per} (the encoders' window is "
                          f"{per + 2})" + (f"; {extras}" if extras else ""), LogLevel.INFO))
    return lines


def refiner_text(found: Conditioning, step: int) -> str:
    """The words the refiner (one text encoder, its own call) reads at ``step``: the phase's text without its
    emphasis syntax and BREAKs."""
    return "".join(f.text for f in found.prompt.phase_at(step).fragments if not f.is_break)
