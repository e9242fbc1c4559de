"""AUTOMATIC1111's prompt grammar, parsed once into a typed result. Pure text (no torch).

* **Emphasis**: ``(x)`` × 1.1, ``((x))`` × 1.21, ``(x:1.3)`` × 1.3, ``[x]`` ÷ 1.1; ``\\(`` ``\\)`` ``\\[`` ``\\]`` are
  the literal characters; an unclosed bracket weights to the end of the prompt (A1111's ``parse_prompt_attention``).
* **BREAK** (upper case, as a word): the next tokens start a new chunk of the encoders' window.
* **Prompt editing** ``[from:to:when]``, ``[to:when]`` (added at ``when``), ``[from::when]`` (removed at ``when``);
  ``when`` is a step, or a fraction of the steps below 1. **Alternation** ``[a|b]``: ``a`` on odd steps, ``b`` on
  even ones. Both give a schedule of texts, each with the last step it conditions (A1111's
  ``get_learned_conditioning_prompt_schedules``); the same meaning as A1111's documented examples, which are this
  module's tests (``tests/foundation/test_prompt_syntax.py``).

Why our own and not compel: compel's weighting is not A1111's — it rescales a downweighted word by blending with
the prompt without it, and its syntax is ``word+``/``(word)1.3``; A1111's is "multiply the word's token embeddings,
then restore the chunk's original mean" (``EmphasisOriginal``), which is what prompts written for A1111 expect. The
prompt-editing grammar is parsed by lark, the library A1111 parses it with; the emphasis is a tokenizer regex.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"

# Emphasis tokens, in order: escapes, brackets, ":weight)" closing a round bracket, plain runs, a lone colon.
ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)

# The prompt-editing grammar (lark): text outside brackets, emphasis kept as text, [from:to:when] and [a|b].
GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER "]"
alternate: "[" prompt ("|" prompt)+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@dataclass(frozen=True)
class Fragment:
    """A run of text with one weight; a ``BREAK`` is its own fragment (``is_break``)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclass(frozen=True)
class Phase:
    """One text of a schedule: it conditions the steps up to ``until`` (1-based, inclusive)."""

    until: int
    text: str  # still with its emphasis syntax (as A1111 hands it to the encoders)
    fragments: tuple[Fragment, ...]

    @property
    def plain(self) -> str | None:
        """The text as plain words when it has no weight other than 1 and no BREAK, else None."""
        if any(f.is_break or f.weight != 1.0 for f in self.fragments):
            return None
        return "".join(f.text for f in self.fragments)


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as written and as the encoders get it: one phase, or a schedule of them over ``steps``."""

    written: str
    steps: int
    phases: tuple[Phase, ...]

    @property
    def scheduled(self) -> bool:
        return len(self.phases) > 1

    @property
    def weights(self) -> tuple[float, ...]:
        """The weights other than 1 that the prompt uses (sorted, each once)."""
        return tuple(sorted({f.weight for p in self.phases for f in p.fragments if not f.is_break
                             and f.weight != 1.0}))

    @property
    def breaks(self) -> int:
        return max(sum(f.is_break for f in p.fragments) for p in self.phases)

    @property
    def plain(self) -> str | None:
        """The prompt as plain text when nothing in it needs more than text (no schedule, weight or BREAK)."""
        return self.phases[0].plain if not self.scheduled else None

    def phase_at(self, step: int) -> Phase:
        """The phase that conditions ``step`` (1-based; A1111's ``reconstruct_cond_batch``)."""
        return next((p for p in self.phases if step <= p.until), self.phases[-1])


def parse_attention(text: str) -> tuple[Fragment, ...]:
    """The text's runs with their weights, merged where neighbours weigh the same (A1111's
    ``parse_prompt_attention``); ``BREAK`` fragments between them."""
    res: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, by: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= by

    for match in ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i > 0:
                    res.append([BREAK, -1.0, True])
                res.append([part, 1.0, False])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for item in res or [["", 1.0, False]]:
        if merged and not item[2] and not merged[-1][2] and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(list(item))
    return tuple(Fragment(t, w, b) for t, w, b in merged if b or t or len(merged) == 1)


@lru_cache(maxsize=1)
def _parser():
    import lark

    return lark.Lark(GRAMMAR)


def schedule(text: str, steps: int) -> tuple[tuple[int, str], ...]:
    """((last step, text), …) of the prompt over ``steps`` steps; a prompt the grammar cannot read (unbalanced
    brackets) is one text for all steps, as A1111 treats it."""
    import lark

    try:
        tree = _parser().parse(text)
    except lark.exceptions.LarkError:
        return ((steps, text),)
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            ends.add(_when(node.children[-1], steps))
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return tuple((end, "".join(_at(tree, end, steps))) for end in sorted(ends))


def _when(token, steps: int) -> int:
    value = float(token)
    return min(steps, int(value * steps if value < 1 else value))


def _at(node, step: int, steps: int):
    """The text of ``node`` at ``step``: each [from:to:when] and [a|b] resolved."""
    import lark

    if isinstance(node, lark.Token):
        yield node.value
        return
    if node is None:
        return
    children = node.children
    if node.data == "scheduled":
        before, after, _space, when = children  # lark gives None for the optional parts left out
        yield from _at(before if step <= _when(when, steps) else after, step, steps)
    elif node.data == "alternate":
        yield from _at(children[(step - 1) % len(children)], step, steps)
    else:
        for child in children:
            yield from _at(child, step, steps)


def parse(text: str, steps: int) -> ParsedPrompt:
    """The prompt parsed once: its schedule over ``steps``, each text's weighted fragments."""
    phases, previous = [], None
    for end, phase_text in schedule(text, max(1, int(steps))):
        if phases and phase_text == previous:  # the same text on consecutive phases: one phase
            phases[-1] = Phase(end, phase_text, phases[-1].fragments)
            continue
        phases.append(Phase(end, phase_text, parse_attention(phase_text)))
        previous = phase_text
    return ParsedPrompt(text, max(1, int(steps)), tuple(phases))
