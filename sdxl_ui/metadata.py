"""A1111-style PNG `parameters` text chunk: write, read, parse.

Format (what AUTOMATIC1111, Civitai and most viewers read):
    <prompt>
    Negative prompt: <negative>
    Steps: 35, Sampler: Euler, CFG scale: 8.0, Seed: 7, Size: 256x256, Model: tiny, ...
Prompts are stored as text (PIL writes iTXt/UTF-8 when they are not Latin-1), never interpreted.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# The last line's fields: what AUTOMATIC1111's regex ``\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)`` finds,
# found by one scan (``_fields``): that regex, tried at every position of a long line without a colon, backtracks
# over the whole run at each one (quadratic: 12 s for a 53 KB line).
KEY_CHAR = re.compile(r"[\w \-/]")
WORD_CHAR = re.compile(r"\w")
SPACES = re.compile(r"\s*")
QUOTED = re.compile(r'\s*("(?:\\.|[^\\"])*")(?:,|$)')
# Control characters never go into the chunk (the request already refuses or removes them in prompts; this also
# covers any other text, e.g. a model name): C0 and C1 (carriage return included) and DEL; tab and line feed stay.
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(value) -> str:
    return CONTROLS.sub("", str(value))


def _quote(value: str) -> str:
    """Quote a value that contains the separator, as A1111 does."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if ("," in text or ":" in text or '"' in text) else text


@dataclass(frozen=True)
class ImageParameters:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    device: str
    dtype: str
    refiner: bool = False
    note: str | None = None
    profile: str | None = None  # the model profile (profiles.py) when it is not plain SDXL
    loras: tuple = ()  # (name, weight, hash) per fused LoRA: A1111's "Lora hashes" field, and their weights
    vae: str | None = None  # A1111's "VAE" field: the decoder of the final image when not the model's own VAE
    schedule: str | None = None  # A1111's "Schedule type" (its label) when the request chose one
    tiling: bool = False  # A1111's "Tiling: True": the picture wraps at its edges
    clip_skip: int = 0  # diffusers' clip_skip; A1111's "Clip skip: N" is N = clip_skip + 1, written when > 1
    prompt_cut: str | None = None  # what of a prompt longer than the chunks' limit was not read (long_prompts)
    denoising_strength: float | None = None  # A1111's "Denoising strength": image to image's strength
    # A1111's fields of a kind of run, in its words and order (e.g. ("Mask blur", "4"), ("Hires upscale", "2")).
    extra: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "loras", tuple((str(n), float(w), str(h)) for n, w, h in self.loras))

    def to_text(self) -> str:
        fields = [
            ("Steps", self.steps), ("Sampler", self.sampler),
            *((("Schedule type", self.schedule),) if self.schedule else ()),
            ("CFG scale", self.cfg_scale), ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"), ("Model", self.model), ("Device", self.device),
            ("Dtype", self.dtype), ("Refiner", "yes" if self.refiner else "no"),
        ]
        if self.profile:
            fields.append(("Profile", self.profile))
        if self.loras:  # as AUTOMATIC1111 writes them: Lora hashes: "name: hash, name: hash"
            fields.append(("Lora hashes", ", ".join(f"{_lora_name(n)}: {h}" for n, _, h in self.loras)))
            fields.append(("Lora weights", ", ".join(f"{_lora_name(n)}: {w:g}" for n, w, _ in self.loras)))
        if self.clip_skip:
            fields.append(("Clip skip", self.clip_skip + 1))
        if self.denoising_strength is not None:
            fields.append(("Denoising strength", f"{self.denoising_strength:g}"))
        fields.extend((str(k), v) for k, v in self.extra)
        if self.tiling:
            fields.append(("Tiling", "True"))
        if self.vae:
            fields.append(("VAE", self.vae))
        if self.prompt_cut:
            fields.append(("Prompt cut", self.prompt_cut))
        if self.note:
            fields.append(("Note", self.note))
        tail = ", ".join(f"{k}: {_quote(_clean(v).replace(chr(10), ' '))}" for k, v in fields)
        # A prompt line that itself starts with "Negative prompt:" would confuse readers; keep it as is (rare).
        return f"{_clean(self.prompt)}\nNegative prompt: {_clean(self.negative_prompt)}\n{tail}"


def _lora_name(name: str) -> str:
    return re.sub(r"[,:\"]", "_", _clean(name))  # the separators of the field's own list


def parse_parameters(text: str) -> dict:
    """Parse a `parameters` chunk back into {'prompt', 'negative_prompt', <key>: <str value>...}."""
    *head, last = text.split("\n")
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in _fields(last):
        value = value.strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:  # an invalid escape, an unterminated quote: the text as it is (A1111's unquote)
                pass
        out[key.strip()] = value
    return out


def _fields(line: str) -> list[tuple[str, str]]:
    """(key, raw value) pairs of a fields line, in linear time; the same pairs as A1111's regex's findall."""
    out, pos, end = [], 0, len(line)
    while pos < end:
        colon = line.find(":", pos)
        if colon < 0:
            break
        start = colon  # the key: the run of key characters before the colon, from its first word character
        while start > pos and KEY_CHAR.match(line, start - 1):
            start -= 1
        while start < colon and not WORD_CHAR.match(line, start):
            start += 1
        if start == colon:  # no key before this colon: a match can only start after it
            pos = colon + 1
            continue
        quoted = QUOTED.match(line, colon + 1)
        if quoted:
            value, pos = quoted.group(1), quoted.end()
        else:
            begin = SPACES.match(line, colon + 1).end()
            comma = line.find(",", begin)
            stop = end if comma < 0 else comma
            value, pos = line[begin:stop], stop + 1
        out.append((line[start:colon], value))
    return out


def save_png(image, target: Path | IO[bytes], params: ImageParameters, extra: dict | None = None) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", params.to_text())  # falls back to iTXt (UTF-8) for non-Latin-1 text
    if extra:
        info.add_text("sdxl_ui", json.dumps(extra, ensure_ascii=False))
    image.save(target, format="PNG", pnginfo=info)


def read_parameters(path: str | Path) -> str | None:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.text.get("parameters")
