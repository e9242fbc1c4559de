"""What a prompt says beside its words, in AUTOMATIC1111's syntax: ``<lora:NAME:WEIGHT>`` extra networks. Pure text
rules (no torch): the tags are taken out of the text the encoders see, the prompt as written stays in the PNG."""
from __future__ import annotations

import re



class PromptError(ValueError):
    """A tag that cannot be read: the request turns it into its ``prompt`` ValidationError."""

    def __init__(self, value: str, problem: str):
        super().__init__(f"{problem} (got {value!r})")
        self.value, self.problem = value, problem

# <lora:NAME>, <lora:NAME:WEIGHT> (A1111's extra-network syntax; a third part, its text-encoder weight, is read as
# A1111 reads it: the first number is the weight). Linear: no nested quantifiers.
LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
MAX_PROMPT_LORAS = 8


def prompt_loras(text: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """(the prompt without its ``<lora:…>`` tags, ((name, weight), …)). A bad tag is refused naming it."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        tag = match.group(0)
        parts = match.group(1).split(":")
        name = parts[0].strip()
        if not name:
            raise PromptError(tag, "a <lora:NAME:WEIGHT> tag names no LoRA")
        weight = 1.0
        if len(parts) > 1 and parts[1].strip():
            try:
                weight = float(parts[1])
            except ValueError:
                raise PromptError(tag, "the weight of a <lora:NAME:WEIGHT> tag must be a number") from None
        if not -10.0 <= weight <= 10.0:
            raise PromptError(tag, "the weight of a <lora:NAME:WEIGHT> tag must be from -10 to 10")
        found.append((name, weight))
        return ""

    clean = LORA_TAG.sub(take, text)
    if len(found) > MAX_PROMPT_LORAS:
        raise PromptError(f"{len(found)} <lora:…> tags", f"at most {MAX_PROMPT_LORAS} per prompt")
    merged: dict[str, float] = {}
    for name, weight in found:  # the same LoRA twice: A1111 sums nothing, the last one counts
        merged[name] = weight
    if not found:
        return text, ()
    clean = re.sub(r"\s+,", ",", " ".join(clean.split()))  # the commas a removed tag leaves behind
    return re.sub(r",(\s*,)+", ",", clean).strip(" ,"), tuple(merged.items())
