"""DeepCache-style feature caching on diffusers' ``UNet2DConditionModel`` (our own implementation).

The UNet is a U: ``conv_in`` → down blocks → mid block → up blocks → ``conv_out``, with a skip connection from
every down level to the up block of the same level. Between neighbouring denoising steps the *deep* features
change slowly (DeepCache, Ma et al. 2023), so most steps can reuse them and run only the shallow branch:

* **full step**: the UNet's own forward runs unchanged, and the feature entering ``up_blocks[L - branch]`` (the
  output of the deep part of the up path; ``L = len(up_blocks)``) is kept.
* **cached step**: only the shallow branch runs: the time/text embeddings, ``conv_in``, ``down_blocks[:branch]``
  (exactly the skip connections the last ``branch`` up blocks consume; the last shallow down block's downsampler
  is skipped when nothing reads it), then ``up_blocks[L - branch:]`` on the kept feature, and the output head.
  With ``branch=1`` on SDXL that is the 128² level of a 1024² image: about 8 % of the UNet's FLOPs.

Which calls are full is decided by counting UNet calls since the last full step: the first call of a run and then
every ``interval``-th call are full. Never by timestep value: Karras schedules can repeat a timestep, and
second-order samplers call the UNet twice per timestep. ``interval=1`` is off: every call runs the original
forward untouched (bit-exact to no caching).

The classifier-free-guidance batch needs nothing special: the UNet's rows are independent, and the kept feature
has the rows of the call that made it. When a later call has *half* as many rows, the conditional half is kept
(diffusers lays the CFG batch out as ``[uncond × N, cond × N]``, and ``guidance_interval`` keeps the second half
when it drops the unconditional branch); ``on_half_batch="recompute"`` makes that a full step instead. Any other
change (more rows, another latent size, dtype or device) forces a full step, counted as ``forced_full_steps``.

Each pipeline call is a new denoising run: call ``reset()`` before every one (or use ``cached(...)``), so that the
first step of a run never reuses the last run's features.

    cache = enable(pipe.unet, interval=3, branch=1)   # or enable(pipe, ...): the pipeline's UNet
    cache.reset()                                      # before each pipeline call
    pipe(...)
    state(pipe)     # {"enabled": True, "interval": 3, "full_steps": 4, "cached_steps": 6, ...} of this run
    disable(pipe)   # the UNet's original forward back, exactly

    with cached(pipe, interval=3) as cache:            # enable + reset for one call, then disable
        pipe(...)
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ATTR = "_sdxl_ui_feature_cache"
HALF_BATCH_POLICIES = ("keep_conditional", "recompute")


@dataclass
class RunCounts:
    """UNet calls of one denoising run. ``trace`` has one letter a call: F full on schedule, R full forced off the
    schedule (no usable kept feature), C cached."""
    calls: int = 0
    full_steps: int = 0
    cached_steps: int = 0
    forced_full_steps: int = 0
    trace: str = field(default="", repr=False)

    def add(self, kind: str) -> None:
        self.calls += 1
        self.trace += kind
        if kind == "C":
            self.cached_steps += 1
        else:
            self.full_steps += 1
            if kind == "R":
                self.forced_full_steps += 1


def _lora_scaled(fn):
    """Apply diffusers' LoRA scaling around ``fn`` exactly as it does around ``UNet2DConditionModel.forward``."""
    try:
        from diffusers.utils.peft_utils import apply_lora_scale
    except ImportError:  # pragma: no cover - older diffusers scaled inside forward
        return fn
    return apply_lora_scale("cross_attention_kwargs")(fn)


@contextlib.contextmanager
def _without_downsampler(block, skip: bool):
    """Run a down block without its downsampler (its output is the one skip connection no shallow up block reads)."""
    if not skip:
        yield
        return
    saved = block.downsamplers
    block.downsamplers = None
    try:
        yield
    finally:
        block.downsamplers = saved


@_lora_scaled
def _shallow_forward(unet, *, feature, branch: int, needed: int, skip_downsampler: bool, sample, timestep,
                     encoder_hidden_states, class_labels=None, timestep_cond=None, attention_mask=None,
                     cross_attention_kwargs=None, added_cond_kwargs=None, encoder_attention_mask=None,
                     return_dict: bool = True):
    """``UNet2DConditionModel.forward`` (diffusers 0.42) with the deep part replaced by ``feature``: the same
    preamble, ``down_blocks[:branch]``, then the last ``branch`` up blocks. Kept line for line with upstream so
    that a cached step on the inputs of the full step that made ``feature`` gives the full step's output exactly
    (tests/hardware/test_feature_cache.py checks it)."""
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    forward_upsample_size = any(dim % (2 ** unet.num_upsamplers) != 0 for dim in sample.shape[-2:])
    upsample_size = None
    if attention_mask is not None:
        attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
        attention_mask = attention_mask.unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
        encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    if unet.config.addition_embed_type == "image_hint":
        aug_emb, hint = aug_emb
        sample = torch.cat([sample, hint], dim=1)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs=added_cond_kwargs)

    sample = unet.conv_in(sample)
    res_samples = (sample,)
    for index, block in enumerate(unet.down_blocks[:branch]):
        with _without_downsampler(block, skip_downsampler and index == branch - 1):
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                                    encoder_attention_mask=encoder_attention_mask)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
        res_samples += res
    # In the full forward the deeper up blocks have consumed every skip connection but the first ``needed``.
    res_samples = res_samples[:needed]

    sample = feature
    count = len(unet.up_blocks)
    for index in range(count - branch, count):
        block = unet.up_blocks[index]
        res = res_samples[-len(block.resnets):]
        res_samples = res_samples[: -len(block.resnets)]
        if index != count - 1 and forward_upsample_size:
            upsample_size = res_samples[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                           upsample_size=upsample_size, attention_mask=attention_mask,
                           encoder_attention_mask=encoder_attention_mask)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    if unet.conv_norm_out:
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
    sample = unet.conv_out(sample)
    if not return_dict:
        return (sample,)
    return UNet2DConditionOutput(sample=sample)


def _freeu_on(block) -> bool:
    return bool(getattr(block, "s1", None) and getattr(block, "s2", None) and getattr(block, "b1", None)
                and getattr(block, "b2", None))


class FeatureCache:
    """The feature cache of one UNet: its configuration, its kept feature, and the counts of the current run.
    Made by ``enable()``; the UNet's ``forward`` is this object's ``_forward`` while it is installed."""

    def __init__(self, unet, interval: int = 3, branch: int = 1, on_half_batch: str = "keep_conditional"):
        from diffusers import UNet2DConditionModel

        if hasattr(unet, "_orig_mod"):
            raise TypeError("feature cache: the UNet is torch.compile'd; enable the cache before compiling, or not "
                            "at all")
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"feature cache: needs a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        self.unet = unet
        self._signature = inspect.signature(type(unet).forward)
        self._hook = None
        self.enabled = False
        self.run = RunCounts()
        self.previous_run: RunCounts | None = None
        self.configure(interval, branch, on_half_batch)
        self._install()

    # ------------------------------------------------------------------ configuration

    def configure(self, interval: int | None = None, branch: int | None = None,
                  on_half_batch: str | None = None) -> "FeatureCache":
        """Change the settings (any of them); starts a new run."""
        interval = self.interval if interval is None else interval
        branch = self.branch if branch is None else branch
        on_half_batch = self.on_half_batch if on_half_batch is None else on_half_batch
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"feature cache: interval must be a whole number ≥ 1 (1 = off), got {interval!r}")
        if on_half_batch not in HALF_BATCH_POLICIES:
            raise ValueError(f"feature cache: on_half_batch must be one of {HALF_BATCH_POLICIES}, got "
                             f"{on_half_batch!r}")
        downs, ups = self.unet.down_blocks, self.unet.up_blocks
        top = min(len(downs), len(ups)) - 1
        if isinstance(branch, bool) or not isinstance(branch, int) or not 1 <= branch <= top:
            raise ValueError(f"feature cache: branch must be a whole number from 1 to {top} for this UNet "
                             f"({len(downs)} down and {len(ups)} up blocks), got {branch!r}")
        needed = sum(len(block.resnets) for block in ups[len(ups) - branch:])
        produced = 1 + sum(len(block.resnets) + (block.downsamplers is not None) for block in downs[:branch])
        if needed > produced:
            raise ValueError(f"feature cache: the last {branch} up block(s) read {needed} skip connections, the first "
                             f"{branch} down block(s) make only {produced}: not a standard U-Net layout")
        self.interval, self.branch, self.on_half_batch = interval, branch, on_half_batch
        self._needed = needed
        self._skip_downsampler = produced - needed == 1 and downs[branch - 1].downsamplers is not None
        self._block = ups[len(ups) - branch]
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._block.register_forward_pre_hook(self._capture, with_kwargs=True)
        self.reset()
        return self

    # ------------------------------------------------------------------ install / restore

    def _install(self) -> None:
        unet = self.unet
        # The forward in place now: the class's own, or an instance wrapper (accelerate's offload hooks set one).
        self._had_own_forward = "forward" in unet.__dict__
        self._inner = unet.__dict__["forward"] if self._had_own_forward else unet.forward
        unet.forward = self._forward
        setattr(unet, ATTR, self)
        self.enabled = True

    def remove(self) -> bool:
        """Put the UNet's previous forward back and drop the hook and the kept feature. False (and the cache left
        in place, but passing every call straight through) when something has wrapped our forward since."""
        unet = self.unet
        self.enabled = False
        self._feature = None
        if unet.__dict__.get("forward") != self._forward:
            log.warning("feature cache: the UNet's forward was wrapped after the cache was enabled; the cache now "
                        "passes every call through instead of being removed")
            return False
        if self._had_own_forward:
            unet.forward = self._inner
        else:
            del unet.forward
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(unet, ATTR, None) is self:
            delattr(unet, ATTR)
        return True

    # ------------------------------------------------------------------ runs

    def reset(self) -> None:
        """A new denoising run: forget the kept feature; the next call is full. The finished run's counts move to
        ``previous_run``."""
        if self.run.calls:
            self.previous_run = self.run
        self.run = RunCounts()
        self._feature = None
        self._feature_key = None
        self._since_full = 0

    def state(self) -> dict[str, Any]:
        """What is live, for a report row: settings and this run's counts (the last run's once it has finished)."""
        counts = asdict(self.run)
        counts.pop("trace")
        out = {"enabled": self.enabled, "interval": self.interval, "branch": self.branch,
               "on_half_batch": self.on_half_batch, "exact": self.interval == 1, **counts}
        if self.previous_run is not None:
            previous = asdict(self.previous_run)
            previous.pop("trace")
            out["previous_run"] = previous
        return out

    # ------------------------------------------------------------------ the forward

    def _capture(self, module, args, kwargs):
        if self._capturing:
            feature = kwargs.get("hidden_states", args[0] if args else None)
            # A copy: FreeU scales the block's input in place.
            self._captured = None if feature is None else feature.detach().clone()
        return None

    _capturing = False
    _captured = None

    def _usable_feature(self, sample):
        feature = self._feature
        if feature is None or self._feature_key != (tuple(sample.shape[1:]), sample.dtype, sample.device):
            return None
        rows, kept = sample.shape[0], feature.shape[0]
        if kept == rows:
            return feature
        if kept == 2 * rows and self.on_half_batch == "keep_conditional":
            self._feature = feature[rows:]  # [uncond × N, cond × N] → cond × N, from now on
            return self._feature
        return None

    def _full(self, args, kwargs, sample, kind: str):
        self._capturing, self._captured = True, None
        try:
            out = self._inner(*args, **kwargs)
        finally:
            self._capturing = False
        self._feature, self._captured = self._captured, None
        self._feature_key = (tuple(sample.shape[1:]), sample.dtype, sample.device)
        self._since_full = 1
        self.run.add(kind)
        return out

    def _forward(self, *args, **kwargs):
        if not self.enabled:
            return self._inner(*args, **kwargs)
        if self.interval == 1:  # off: the original forward, untouched
            self.run.add("F")
            return self._inner(*args, **kwargs)
        bound = self._signature.bind(self.unet, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop(next(iter(self._signature.parameters)))  # self
        sample = call["sample"]
        unsupported = (call.get("down_block_additional_residuals") is not None
                       or call.get("mid_block_additional_residual") is not None
                       or call.get("down_intrablock_additional_residuals") is not None
                       or (call.get("cross_attention_kwargs") or {}).get("gligen") is not None)
        if unsupported:  # ControlNet / T2I-Adapter / GLIGEN residuals reach the deep levels: always full
            self._feature = None
            self.run.add("R")
            return self._inner(*args, **kwargs)
        for name in ("down_block_additional_residuals", "mid_block_additional_residual",
                     "down_intrablock_additional_residuals"):
            call.pop(name, None)
        due = self._feature is None or self._since_full >= self.interval
        if due:
            return self._full(args, kwargs, sample, "F")
        feature = self._usable_feature(sample)
        if feature is None:
            return self._full(args, kwargs, sample, "R")
        if _freeu_on(self._block):
            feature = feature.clone()
        out = _shallow_forward(self.unet, feature=feature, branch=self.branch, needed=self._needed,
                               skip_downsampler=self._skip_downsampler, **call)
        self._since_full += 1
        self.run.add("C")
        return out


# ---------------------------------------------------------------------- module API

def _unet_of(target):
    unet = getattr(target, "unet", None)
    return target if unet is None else unet


def get(target) -> FeatureCache | None:
    """The cache installed on a UNet (or a pipeline's UNet), or None."""
    return getattr(_unet_of(target), ATTR, None)


def enable(target, interval: int = 3, branch: int = 1, on_half_batch: str = "keep_conditional") -> FeatureCache:
    """Install the cache on ``target`` (a UNet2DConditionModel or a pipeline with ``.unet``), or reconfigure the one
    already there. Returns its controller; a new run starts either way."""
    existing = get(target)
    if existing is not None:
        if not existing.enabled:
            existing.enabled = True
        return existing.configure(interval, branch, on_half_batch)
    return FeatureCache(_unet_of(target), interval, branch, on_half_batch)


def disable(target) -> bool:
    """Remove the cache: the UNet's forward is what it was before ``enable``. False when none was installed."""
    cache = get(target)
    return cache.remove() if cache is not None else False


def reset(target) -> None:
    """Start a new denoising run (no-op without a cache): call before every pipeline call."""
    cache = get(target)
    if cache is not None:
        cache.reset()


def state(target) -> dict[str, Any]:
    """The live state for a report row: ``{"enabled": False}`` without a cache."""
    cache = get(target)
    return cache.state() if cache is not None and cache.enabled else {"enabled": False}


@contextlib.contextmanager
def cached(target, interval: int = 3, branch: int = 1, on_half_batch: str = "keep_conditional"):
    """Feature caching for the pipeline calls inside the block (one run each: call ``reset()`` between two).
    Restores what was there before: no cache, or the previous settings."""
    before = get(target)
    settings = (before.interval, before.branch, before.on_half_batch) if before is not None and before.enabled \
        else None
    cache = enable(target, interval, branch, on_half_batch)
    try:
        yield cache
    finally:
        if settings is None:
            cache.remove()
        else:
            cache.configure(*settings)
