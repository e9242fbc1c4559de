"""What the picture is, beside its prompt: tiling (A1111's ``tiling``), a picture that wraps at its edges and tiles
seamlessly. One unit: the request's switch, the circular padding of every convolution of the UNet and the VAE
(as A1111 does it), and the row read back from the live convolutions."""
from __future__ import annotations

from ..settings import Toggle
from .base import REQUIRED, Switch, Unit, live_row, pipes, planned_row


def set_tiling(pipe, on: bool) -> int:
    """Circular (``on``) or zero padding for every Conv2d of the pipeline's UNet and VAE; how many were set. The
    weights are untouched: off restores the pipeline exactly."""
    import torch

    count = 0
    for part in _parts(pipe):
        for module in part.modules() if part is not None else ():
            if isinstance(module, torch.nn.Conv2d):
                module.padding_mode = "circular" if on else "zeros"
                count += 1
    return count


def _parts(pipe) -> tuple:
    """The UNet, the VAE and the modules the run hooks run beside them (a decoder that may decode the final image)."""
    from . import hooks

    return getattr(pipe, "unet", None), getattr(pipe, "vae", None), *hooks.modules(pipe)


def circular_convolutions(pipe) -> tuple[int, int]:
    """(convolutions with circular padding, all convolutions) of the UNet and the VAE."""
    import torch

    convs = [m for part in _parts(pipe) if part is not None for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(m.padding_mode == "circular" for m in convs), len(convs)


class Tiling(Unit):
    key, rows = "tiling", ("tiling",)
    fields = {"tiling": REQUIRED}
    decide_at, apply_at, row_at = 160, 85, 135
    per_request = ("tiling",)
    switch = Switch("tiling", "Tiling (on: the picture wraps at its edges, a seamless texture)",
                    "a picture that tiles seamlessly: circular padding in the UNet's and the VAE's convolutions")

    def decide(self, ctx):
        on = ctx.switch("tiling") is Toggle.ON
        ctx.values["tiling"] = on
        if on and ctx.values.get("vae_tiling"):
            ctx.warnings.append("tiling: the VAE decodes in tiles at this size, so the picture's edges may not meet "
                                "seamlessly (--vae-tiling off, or a smaller size)")
        ctx.reasons["tiling"] = ("on for this request: circular padding in every UNet and VAE convolution, so the "
                                 "picture wraps at its edges (A1111's tiling)" if on else
                                 "off: an ordinary picture (on: it wraps at its edges and tiles seamlessly)")

    def apply(self, plan, models):
        for pipe in pipes(models):
            set_tiling(pipe, bool(plan.tiling))

    def evidence(self, plan):
        return {"tiling": "circular"} if plan.tiling else {}

    def expected(self, plan, probe):
        return [planned_row("tiling", plan.tiling, plan.reasons["tiling"])]

    def live(self, live):
        circular, total = circular_convolutions(live.base)
        detail = f"{circular} of {total} UNet and VAE convolutions pad circular" if circular else ""
        return [live_row("tiling", circular == total > 0, live.plan.tiling, live.plan.reasons["tiling"], detail)]


class PromptHandling(Unit):
    """How the prompt conditions the run, in AUTOMATIC1111's syntax (``prompt_syntax``, ``long_prompts``): not a
    decision of the plan but read back from the last run (its chunks, weights, BREAKs and schedule)."""

    key, rows = "prompt", ("prompt handling",)
    decide_at, row_at = 165, 137

    def decide(self, ctx):
        ctx.reasons["prompt"] = ("AUTOMATIC1111's prompt syntax: (word:1.2) and [word] weights, BREAK, "
                                 "[from:to:when] and [a|b]; beyond the encoders' window in chunks of it (up to 8, "
                                 "600 tokens for SDXL; the log says what is cut past them)")

    def expected(self, plan, probe):
        return [planned_row("prompt handling", True, plan.reasons["prompt"])]

    def live(self, live):
        from . import hooks

        found = hooks.state(live.base, "prompt")
        state = found.summary() if found is not None else "no run yet"
        return [live_row("prompt handling", True, True, live.plan.reasons["prompt"], state)]


UNITS = (Tiling(), PromptHandling())
