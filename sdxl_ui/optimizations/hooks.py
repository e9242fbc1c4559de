"""Run hooks: how a technique takes part in a run without the denoising loop, the decode or the service naming it.

Every pipeline carries one registry (``registry(pipe)``, one attribute, as diffusers' ``HookRegistry``): the run
hooks installed on it by name, in the order installed, and the techniques' state by name (``state``/``set_state``:
the tiny decoder, the fused LoRAs and their original weights). A unit's ``apply`` (or its ``loaded``, after a model
load) installs a hook under its name or removes it; the run calls the points below, and each installed hook that
has the point's method gets its say. Every method is optional:

* ``before(pipe)`` — ``pipe`` is about to run (a pipeline call, or the decode after the refiner): e.g. model
  offload gives ``pipe`` its own hook chain on the modules base and refiner share;
* ``begin(pipe)`` — a new denoising run starts (e.g. the feature cache forgets the previous run's features);
* ``wrap(pipe, step_callback)`` — returns ``(step_callback, context)``: the callback diffusers calls at each
  step's end (possibly a wrapper around the given one) and a context manager held around the call (e.g. UNet
  hooks that the guidance interval needs). ``context`` may be ``None``;
* ``decode(pipe, latents)`` — the final image as a -1…1 tensor instead of the VAE's decode, or ``None``;
* ``decoder_name(pipe)`` — what decoded the final image when it was not the VAE (the PNG's ``VAE`` field), or None;
* ``preview(pipe, latents)`` — a live preview (PIL) instead of the latent approximation, or ``None``;
* ``modules(pipe)`` — modules beside the pipeline's own that run on its latents (e.g. the tiny decoder: tiling
  pads its convolutions too);
* ``release(pipe)`` — the run ended, however it ended (e.g. offload: every model back on the CPU).

Like diffusers' ``HookRegistry`` and InvokeAI's denoise extensions, the loop only knows the protocol. Pure Python
(torch never imported here)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

ATTR = "_sdxl_ui_registry"  # the one attribute sdxl_ui sets on a pipeline


class RunHook(Protocol):
    def begin(self, pipe) -> None: ...

    def wrap(self, pipe, step_callback): ...


@dataclass
class Registry:
    """A pipeline's run hooks (by name, in the order installed) and its techniques' state (by name)."""

    hooks: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def registry(pipe) -> Registry:
    """``pipe``'s registry (created empty on first use)."""
    found = getattr(pipe, ATTR, None)
    if found is None:
        found = Registry()
        setattr(pipe, ATTR, found)
    return found


def share(source, target) -> None:
    """``target`` (a pipeline over ``source``'s own modules, e.g. diffusers' ``from_pipe``) gets ``source``'s
    registry: the same hooks and state, not a copy."""
    setattr(target, ATTR, registry(source))


def installed(pipe) -> dict[str, Any]:
    """The hooks on ``pipe`` by name (a copy; empty when none)."""
    found = getattr(pipe, ATTR, None)
    return dict(found.hooks) if found is not None else {}


def get(pipe, name: str):
    return installed(pipe).get(name)


def install(pipe, name: str, hook) -> None:
    """Install (or replace) the hook called ``name`` on ``pipe``; ``None`` removes it."""
    hooks = registry(pipe).hooks
    if hook is None:
        hooks.pop(name, None)
    else:
        hooks[name] = hook


def state(pipe, name: str, default=None):
    """A technique's state on ``pipe`` (``default`` when it has none)."""
    found = getattr(pipe, ATTR, None)
    return found.state.get(name, default) if found is not None else default


def set_state(pipe, name: str, value) -> None:
    """Set a technique's state on ``pipe``; ``None`` removes it."""
    values = registry(pipe).state
    if value is None:
        values.pop(name, None)
    else:
        values[name] = value


def _methods(pipe, point: str) -> list:
    return [method for hook in installed(pipe).values() if (method := getattr(hook, point, None)) is not None]


def _first(pipe, point: str, *args):
    for method in _methods(pipe, point):
        found = method(pipe, *args)
        if found is not None:
            return found
    return None


def before(pipe) -> None:
    """``pipe`` is about to run (a pipeline call, the decode after another pipeline ran)."""
    for method in _methods(pipe, "before"):
        method(pipe)


def decode(pipe, latents):
    """The final image by an installed decoder (a -1…1 tensor), or None: the pipeline's VAE decodes."""
    return _first(pipe, "decode", latents)


def decoder_name(pipe) -> str | None:
    return _first(pipe, "decoder_name")


def preview(pipe, latents):
    """A live preview by an installed hook (PIL), or None: the latent approximation."""
    return _first(pipe, "preview", latents)


def modules(pipe) -> list:
    """The modules the installed hooks run beside the pipeline's own."""
    return [module for method in _methods(pipe, "modules") for module in method(pipe)]


def release(pipe) -> None:
    """The run ended (finished, stopped or failed)."""
    for method in _methods(pipe, "release"):
        method(pipe)


def call(pipe, step_callback, **kwargs):
    """One pipeline call as a new denoising run, with every installed hook; returns ``.images``."""
    before(pipe)
    hooks = list(installed(pipe).values())
    for hook in hooks:
        if (begin := getattr(hook, "begin", None)) is not None:
            begin(pipe)
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            if (wrap := getattr(hook, "wrap", None)) is not None:
                step_callback, context = wrap(pipe, step_callback)
                if context is not None:
                    stack.enter_context(context)
        return pipe(callback_on_step_end=step_callback, **kwargs).images
