"""Classifier-free guidance only inside a guidance interval of the schedule.

With CFG every denoising step runs the UNet on ``2N`` rows: ``N`` unconditional (negative prompt) and ``N``
conditional. Guidance matters most in the middle of the schedule; in the low-noise tail it barely changes the
picture, and in the high-noise head it can even hurt (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval"; Castillo et al. 2023, adaptive guidance: −25 % evaluations). Outside the interval a step runs only the
conditional rows, i.e. the prediction is exactly the conditional one, and ``N`` row-evaluations are saved.

The interval is in fractions of the steps of the pipeline call: step ``i`` of ``n`` is guided when
``ceil(start·n) ≤ i < ceil(stop·n)``. ``start=0, stop=1`` is plain CFG (bit-exact).

* **The tail** (steps after the interval) uses diffusers' step-end callback, like its ``SDXLCFGCutoffCallback``
  but right for any batch: at the end of the last guided step ``prompt_embeds``, ``add_text_embeds`` and
  ``add_time_ids`` keep their *second half* (diffusers lays the CFG batch out as ``[uncond × N, cond × N]``;
  ``SDXLCFGCutoffCallback`` keeps ``[-1:]``, one row, right only for one image per call) and the pipeline's
  ``_guidance_scale`` becomes 1, so the loop stops doubling the latents. The second half is exactly what the
  conditional rows had: for the base, whose ``add_time_ids`` are ``[neg, pos]`` repeated per image, too; for the
  refiner, whose time ids carry the aesthetic score (6.0 conditional, 2.5 unconditional), too.
* **The head** (steps before the interval) happens before any callback can run, so it needs ``attach(pipe)``:
  a forward pre-hook on the UNet passes it only the conditional half of each ``2N``-row input and a forward hook
  returns that prediction twice, so the pipeline's ``uncond + g·(cond − uncond)`` is exactly ``cond``.

With the feature cache: at the tail the cache sees its batch halve and keeps the conditional half of its kept
feature; when the head ends the batch doubles and the cache runs a full step (it cannot invent the unconditional
rows).

    gi = GuidanceInterval(start=0.0, stop=0.7, then=progress_callback)
    with gi.attached(pipe):                     # needed for start > 0; harmless otherwise
        pipe(..., callback_on_step_end=gi)      # gi is a PipelineCallback: the pipeline passes it the tensors
    gi.stats()      # {"steps": 20, "guided_steps": 14, "unguided_steps": 6, "evaluations_saved": 6, ...}

Not supported: IP-Adapter ``image_embeds`` with a tail (the pipeline does not hand them to callbacks to halve).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any

from diffusers.callbacks import PipelineCallback

HALVED = ("prompt_embeds", "add_text_embeds", "add_time_ids")
# The inpainting pipeline's doubled mask (and, for a 9-channel UNet, masked-image latents): halved with the rest
# when the pipeline hands them to callbacks, else its next step blends a 2N-row mask into N-row latents.
HALVED_IF_THERE = ("mask", "masked_image_latents")
_EPS = 1e-9


def guided_steps(n: int, start: float = 0.0, stop: float = 1.0) -> list[bool]:
    """Which of ``n`` steps run the unconditional branch."""
    first, end = math.ceil(start * n - _EPS), math.ceil(stop * n - _EPS)
    return [first <= i < end for i in range(n)]


def evaluations(n: int, images: int, start: float = 0.0, stop: float = 1.0) -> tuple[int, int]:
    """(row-evaluations of the UNet, row-evaluations saved) for ``n`` steps of ``images`` images with CFG: a guided
    step evaluates ``2·images`` rows, an unguided one ``images``."""
    guided = sum(guided_steps(n, start, stop))
    return images * (n + guided), images * (n - guided)


@dataclass
class GuidanceStats:
    """One pipeline call. ``evaluations`` counts UNet rows (an image's conditional or unconditional prediction
    at one step); ``evaluations_saved`` those that plain CFG would have run and this did not."""
    cfg: bool = False
    steps: int = 0
    guided_steps: int = 0
    unguided_steps: int = 0
    images: int = 0
    evaluations: int = 0
    evaluations_saved: int = 0

    @property
    def fraction_saved(self) -> float:
        total = self.evaluations + self.evaluations_saved
        return self.evaluations_saved / total if total else 0.0


def _second_half(value, rows: int):
    """The conditional half of a CFG-batched input; anything without ``rows`` rows unchanged."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return value[rows // 2:] if len(shape) and shape[0] == rows else value
    if isinstance(value, dict):
        return {k: _second_half(v, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_second_half(v, rows) for v in value)
    return value


class GuidanceInterval(PipelineCallback):
    """A ``callback_on_step_end`` for StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and
    StableDiffusionXLInpaintPipeline (diffusers 0.42) that confines classifier-free guidance to ``[start, stop)`` of the schedule. ``then``: another step-end
    callback (a function or a PipelineCallback) called after this one with the same arguments."""

    tensor_inputs = ["latents", *HALVED]

    def __init__(self, start: float = 0.0, stop: float = 1.0, then=None):
        super().__init__()
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"guidance interval: {name} must be a fraction from 0 to 1, got {value!r}")
        self.start, self.stop, self.then = float(start), float(stop), then
        self.tensor_inputs = list(dict.fromkeys([*GuidanceInterval.tensor_inputs,
                                                 *getattr(then, "tensor_inputs", [])]))
        self._pipe = None
        self._handles = []
        self.reset()

    # ------------------------------------------------------------------ configuration

    @property
    def exact(self) -> bool:
        """Plain CFG on every step."""
        return self.start == 0.0 and self.stop == 1.0

    @property
    def needs_hook(self) -> bool:
        """Step 0 is unguided (a head, or an empty interval): only ``attach`` can act before the first callback."""
        return self.start > 0.0 or self.stop <= self.start

    def schedule(self, n: int) -> list[bool]:
        return guided_steps(n, self.start, self.stop)

    # ------------------------------------------------------------------ attach / detach

    def attach(self, pipe) -> "GuidanceInterval":
        """Hook the pipeline's UNet (for a head) and start a new run."""
        self.detach()
        self._pipe = pipe
        self._handles = [pipe.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                         pipe.unet.register_forward_hook(self._post_hook, with_kwargs=True)]
        self.reset()
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore_scale()
        self._pipe = None

    # ------------------------------------------------------------------ run hook (``optimizations/hooks.py``)

    def begin(self, pipe) -> None:
        pass  # ``attach`` starts the run

    def wrap(self, pipe, step_callback):
        """Become the step-end callback for one pipeline call, passing each step on to ``step_callback``."""
        self.then = step_callback
        own = [k for k in HALVED_IF_THERE if k in getattr(pipe, "_callback_tensor_inputs", ())]
        self.tensor_inputs = list(dict.fromkeys([*type(self).tensor_inputs, *own,
                                                 *getattr(step_callback, "tensor_inputs", [])]))
        return self, self.attached(pipe)

    @contextlib.contextmanager
    def attached(self, pipe):
        self.attach(pipe)
        try:
            yield self
        finally:
            self.detach()

    # ------------------------------------------------------------------ runs

    def reset(self) -> None:
        self._run = GuidanceStats()
        self._calls = 0
        self._halved = False
        self._skipped_step = -1
        self._duplicate = False
        self._finished = False
        self._restore_scale()

    def _restore_scale(self) -> None:
        saved = getattr(self, "_saved_scale", None)
        if saved is not None:
            pipe, scale = saved
            pipe._guidance_scale = scale
        self._saved_scale = None

    def stats(self) -> dict[str, Any]:
        """This run's counts (the last run's once it has finished), with ``fraction_saved``."""
        out = asdict(self._run)
        out["fraction_saved"] = round(self._run.fraction_saved, 4)
        return out

    @property
    def evaluations_saved(self) -> int:
        return self._run.evaluations_saved

    def state(self) -> dict[str, Any]:
        """What is live, for a report row."""
        return {"enabled": True, "start": self.start, "stop": self.stop, "exact": self.exact, **self.stats()}

    # ------------------------------------------------------------------ the head: UNet hooks

    def _pre_hook(self, module, args, kwargs):
        if self._finished:  # the previous call of an attached pipeline ran to its end: a new run
            self.reset()
        step, self._calls = self._calls, self._calls + 1
        self._duplicate = False
        pipe = self._pipe
        if self._halved or not pipe.do_classifier_free_guidance:
            return None
        if self.schedule(pipe.num_timesteps)[step]:
            return None
        sample = args[0] if args else kwargs["sample"]
        rows = sample.shape[0]
        if rows % 2:
            raise RuntimeError(f"guidance interval: a CFG batch has an even number of rows, this one {rows}")
        self._duplicate, self._skipped_step = True, step
        return _second_half(args, rows), _second_half(kwargs, rows)

    def _post_hook(self, module, args, kwargs, output):
        if not self._duplicate:
            return None
        import torch

        self._duplicate = False
        if isinstance(output, tuple):
            return (torch.cat([output[0], output[0]]), *output[1:])
        return type(output)(sample=torch.cat([output.sample, output.sample]))

    # ------------------------------------------------------------------ the step-end callback

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict[str, Any]:
        i, n = step_index, pipeline.num_timesteps
        if self._pipe is None:
            if self.needs_hook:
                raise RuntimeError("guidance interval: an interval that leaves step 0 unguided needs "
                                   "attach(pipe) (or `with interval.attached(pipe):`) around the pipeline call")
            if i == 0:
                self.reset()
        elif getattr(self._pipe, "unet", None) is not pipeline.unet or i != self._calls - 1:
            # (the same UNet, not necessarily the same object: a wrapper around the pipeline may have been attached)
            raise RuntimeError(f"guidance interval: step {i} after {self._calls} UNet calls of this run: attach it "
                               "to the pipeline it runs in, and reset() it before each pipeline call")
        run = self._run
        rows = callback_kwargs["latents"].shape[0]
        if run.steps == 0:
            run.cfg, run.images = bool(pipeline.do_classifier_free_guidance), rows
        run.steps += 1
        if not run.cfg:
            run.evaluations += rows
        elif self._halved or self._skipped_step == i:
            run.unguided_steps += 1
            run.evaluations += rows
            run.evaluations_saved += rows
        else:
            run.guided_steps += 1
            run.evaluations += 2 * rows

        schedule = self.schedule(n)
        if run.cfg and not self._halved and i < n - 1 and not any(schedule[i + 1:]):
            for key in HALVED:  # the rest of the run is unguided: drop the unconditional rows for good
                value = callback_kwargs[key]
                if value.shape[0] != 2 * rows:
                    raise RuntimeError(f"guidance interval: {key} has {value.shape[0]} rows, expected {2 * rows} "
                                       "(the CFG batch of the latents' rows)")
                callback_kwargs[key] = value[rows:]
            for key in HALVED_IF_THERE:
                value = callback_kwargs.get(key)
                if value is not None and value.shape[0] == 2 * rows:
                    callback_kwargs[key] = value[rows:]
            self._saved_scale = (pipeline, pipeline._guidance_scale)
            pipeline._guidance_scale = 1.0  # do_classifier_free_guidance is now False: no doubled latents
            self._halved = True
        if i == n - 1:
            self._restore_scale()
            self._finished = True
        if self.then is not None:
            callback_kwargs = self.then(pipeline, step_index, timestep, callback_kwargs)
        return callback_kwargs
