"""Run hooks: how a technique takes part in a pipeline call without the denoising loop naming it.

A unit's ``apply`` installs a hook on a pipeline under the unit's name (or removes it); ``denoise`` runs every
pipeline call through ``call(pipe, step_callback, **kwargs)``, which gives each installed hook its say, in the
order installed:

* ``begin(pipe)`` — a new denoising run starts (e.g. the feature cache forgets the previous run's features);
* ``wrap(pipe, step_callback)`` — returns ``(step_callback, context)``: the callback diffusers calls at each
  step's end (possibly a wrapper around the given one) and a context manager held around the call (e.g. UNet
  hooks that the guidance interval needs). ``context`` may be ``None``.

Like diffusers' ``HookRegistry`` and InvokeAI's denoise extensions, the loop only knows the protocol. Pure Python
(torch never imported here)."""
from __future__ import annotations

import contextlib
from typing import Any, Protocol

ATTR = "_sdxl_ui_run_hooks"


class RunHook(Protocol):
    def begin(self, pipe) -> None: ...

    def wrap(self, pipe, step_callback): ...


def installed(pipe) -> dict[str, Any]:
    """The hooks on ``pipe`` by name (a copy; empty when none)."""
    return dict(getattr(pipe, ATTR, None) or {})


def get(pipe, name: str):
    return (getattr(pipe, ATTR, None) or {}).get(name)


def install(pipe, name: str, hook) -> None:
    """Install (or replace) the hook called ``name`` on ``pipe``; ``None`` removes it."""
    hooks = dict(getattr(pipe, ATTR, None) or {})
    if hook is None:
        hooks.pop(name, None)
    else:
        hooks[name] = hook
    setattr(pipe, ATTR, hooks)


def call(pipe, step_callback, **kwargs):
    """One pipeline call as a new denoising run, with every installed hook; returns ``.images``."""
    hooks = list(installed(pipe).values())
    for hook in hooks:
        hook.begin(pipe)
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            step_callback, context = hook.wrap(pipe, step_callback)
            if context is not None:
                stack.enter_context(context)
        return pipe(callback_on_step_end=step_callback, **kwargs).images
