"""Less work per image, switched per request (the page's Advanced, the CLI's flags, ``techniques`` of a
request): the DeepCache-style feature cache and the guidance interval. Each unit carries its quality presets'
values, its switch, and installs its run hook on the pipeline (``hooks``): the denoising loop never names them."""
from __future__ import annotations

from ..schema import Quality, Toggle
from . import hooks
from .profile import family
from .base import Switch, Unit, is_compiled, live_row, pipes, planned_row

DEFAULT_CACHE_INTERVAL = 3  # DeepCache's SDXL setting: 2.6× (its README)
CACHE_BRANCH = 1  # the shallow branch: the outermost level (DeepCache's SDXL setting, cache_layer_id 0)
DEFAULT_GUIDANCE_INTERVAL = (0.0, 0.6)  # guided for the first 60 % of the steps (adaptive guidance, see presets)
EXACT_GUIDANCE = (0.0, 1.0)


def _preset_name(high_quality: bool) -> str:
    return "High quality" if high_quality else "Fast"


class CacheRun:
    """The feature cache's run hook: every pipeline call starts a new run of whatever cache is on its UNet."""

    def begin(self, pipe) -> None:
        from . import feature_cache

        feature_cache.reset(pipe.unet)

    def wrap(self, pipe, step_callback):
        return step_callback, None


class FeatureCache(Unit):
    """DeepCache-style reuse of the deep UNet features (``optimizations/feature_cache.py``)."""

    key, rows = "feature_cache", ("feature cache",)
    fields = {"feature_cache": 1}  # UNet calls per full step (1 = off: every call runs the whole UNet)
    decide_at, apply_at, row_at = 130, 70, 120
    per_request = ("feature_cache",)
    switch = Switch("feature_cache", "Feature cache (auto: on for Fast; reuses deep UNet features on 2 of 3 steps)",
                    "reuse deep UNet features between steps (auto: on for Fast)")
    # Fast reuses the deep UNet features for 2 of every 3 steps; High quality stays exact (README, "Less work").
    presets = {Quality.HIGH: 1, Quality.FAST: 3}

    def decide(self, ctx):
        preset = self.presets[Quality.HIGH if ctx.high_quality else Quality.FAST]
        toggle = ctx.switch(self.switch.name)
        prof = family(ctx)
        if not prof.feature_cache:
            interval, why = 1, (f"not applicable: {prof.label} runs {prof.steps_for(ctx.high_quality)} steps far "
                                "apart; the cache reuses deep features between the close steps of a long schedule")
        elif ctx.settings.compile and toggle is not Toggle.OFF:
            interval, why = 1, "off: --compile replaces the UNet's forward, which the cache needs to wrap"
        elif toggle is Toggle.OFF:
            interval, why = 1, "turned off for this request (Advanced)"
        elif toggle is Toggle.ON:
            interval = preset if preset > 1 else DEFAULT_CACHE_INTERVAL
            why = f"turned on for this request (Advanced): {_cache_words(interval)}"
        elif preset > 1:
            interval, why = preset, f"{_preset_name(ctx.high_quality)} preset: {_cache_words(preset)}"
        else:
            interval, why = 1, "High quality stays exact: every step runs the whole UNet"
        ctx.values["feature_cache"], ctx.reasons["feature_cache"] = interval, why

    def apply(self, plan, models):
        from . import feature_cache

        for pipe in pipes(models):
            hooks.install(pipe, "feature_cache", CacheRun())
            if is_compiled(pipe.unet):
                continue
            if plan.feature_cache > 1:
                feature_cache.enable(pipe.unet, interval=plan.feature_cache, branch=CACHE_BRANCH)
            else:
                feature_cache.disable(pipe.unet)

    def evidence(self, plan):
        return {"feature cache": "cached UNet calls"} if plan.feature_cache > 1 else {}

    def expected(self, plan, probe):
        return [planned_row("feature cache", plan.feature_cache > 1, plan.reasons["feature_cache"])]

    def live(self, live):
        from . import feature_cache

        state = feature_cache.state(live.base.unet)
        active = bool(state.get("enabled")) and state.get("interval", 1) > 1
        detail = ""
        if active:
            run = state.get("previous_run") or {k: state.get(k, 0) for k in ("full_steps", "cached_steps")}
            detail = f"interval {state['interval']} on the UNet"
            if run.get("full_steps") or run.get("cached_steps"):
                detail += f"; last run: {run['full_steps']} full, {run['cached_steps']} cached UNet calls"
        return [live_row("feature cache", active, live.plan.feature_cache > 1, live.plan.reasons["feature_cache"],
                         detail)]


def _cache_words(interval: int) -> str:
    return (f"1 UNet call in {interval} runs in full, the {interval - 1} between reuse its deep features and run "
            f"only the outermost level (DeepCache-style; published for SDXL: 2.6× at interval 3, FID 24.16 → 25.68)")


class GuidanceIntervalUnit(Unit):
    """Classifier-free guidance only inside an interval of the schedule (``optimizations/guidance_interval.py``)."""

    key, rows = "guidance_interval", ("guidance interval",)
    fields = {"guidance_interval": EXACT_GUIDANCE}  # fractions of the steps that run CFG ((0, 1) = all)
    decide_at, apply_at, row_at = 140, 80, 130
    per_request = ("guidance_interval",)
    switch = Switch("guidance_interval", "Guidance interval (auto: the negative prompt's branch for the first 60 % "
                    "of the steps)",
                    "run the negative prompt's branch only in part of the schedule (auto: the preset's)")
    # Both presets run the negative prompt's branch for the first 60 % of the steps only (adaptive guidance: the
    # low-noise tail barely changes with guidance; judged by `eval-demo --compare`).
    presets = {Quality.HIGH: (0.0, 0.6), Quality.FAST: (0.0, 0.6)}

    def decide(self, ctx):
        chosen = tuple(self.presets[Quality.HIGH if ctx.high_quality else Quality.FAST])
        toggle, name = ctx.switch(self.switch.name), _preset_name(ctx.high_quality)
        prof = family(ctx)
        if prof.guidance_free:
            interval, why = EXACT_GUIDANCE, (f"not applicable: {prof.label} runs at guidance {prof.guidance:g}, "
                                             "without a negative prompt's branch to cut")
        elif toggle is Toggle.OFF:
            interval, why = EXACT_GUIDANCE, "turned off for this request (Advanced): guidance on every step"
        elif toggle is Toggle.ON:
            interval = chosen if chosen != EXACT_GUIDANCE else DEFAULT_GUIDANCE_INTERVAL
            why = f"turned on for this request (Advanced): {_interval_words(interval)}"
        elif chosen != EXACT_GUIDANCE:
            interval, why = chosen, f"{name} preset: {_interval_words(chosen)}"
        else:
            interval, why = EXACT_GUIDANCE, f"{name} preset: guidance on every step"
        ctx.values["guidance_interval"], ctx.reasons["guidance_interval"] = tuple(interval), why

    def apply(self, plan, models):
        from .guidance_interval import GuidanceInterval

        interval = tuple(plan.guidance_interval)
        for pipe in pipes(models):
            hooks.install(pipe, "guidance_interval",
                          None if interval == EXACT_GUIDANCE else GuidanceInterval(*interval))

    def evidence(self, plan):
        return {"guidance interval": "conditional-only steps"} if tuple(plan.guidance_interval) != EXACT_GUIDANCE \
            else {}

    def expected(self, plan, probe):
        return [planned_row("guidance interval", tuple(plan.guidance_interval) != EXACT_GUIDANCE,
                            plan.reasons["guidance_interval"])]

    def live(self, live):
        gi = hooks.get(live.base, "guidance_interval")
        active = gi is not None and not gi.exact
        detail = ""
        if active:
            detail = f"guided from {gi.start:.0%} to {gi.stop:.0%} of the steps"
            stats = gi.stats()
            if stats["steps"]:
                detail += (f"; last run: {stats['guided_steps']} guided, {stats['unguided_steps']} "
                           f"conditional-only steps, {stats['evaluations_saved']} of "
                           f"{stats['evaluations'] + stats['evaluations_saved']} UNet rows saved")
        planned = tuple(live.plan.guidance_interval) != EXACT_GUIDANCE
        return [live_row("guidance interval", active, planned, live.plan.reasons["guidance_interval"], detail)]


def _interval_words(interval) -> str:
    start, stop = interval
    saved = (1 - (stop - start)) / 2  # of the UNet rows: a guided step runs 2 rows per image, an unguided one 1
    head = f"the first {start:.0%} and " if start > 0 else ""
    return (f"the negative prompt's branch runs from {start:.0%} to {stop:.0%} of the steps only ({head}the last "
            f"{1 - stop:.0%} run the conditional branch alone, ~{saved:.0%} fewer UNet rows; Kynkäänniemi et al. "
            "2024, Castillo et al. 2023)")


class TinyDecoder(Unit):
    """The final image's decoder: the full VAE, or with ``--decoder tiny`` the tiny decoder (AutoencoderTiny,
    ``tiny_decoder.py``: a run hook, installed by ``loaded`` after the model loads), which also draws the previews
    whenever present."""

    key, rows = "decoder", ("tiny decoder",)
    fields = {"decoder": "full"}
    decide_at, apply_at, row_at = 150, 87, 65
    per_request = ("decoder",)  # a request's own choice (GenerationRequest.decoder), over the loaded decoder

    def decide(self, ctx):
        tiny = ctx.settings.decoder == "tiny"
        ctx.values["decoder"] = ctx.settings.decoder
        ctx.reasons["decoder"] = (
            "the tiny decoder decodes the final image (--decoder tiny, or the request's decoder): a fraction of the "
            "VAE's decode time; it changes the picture (an approximation of the full VAE: softer detail, slightly other colours)"
            if tiny else "the full VAE decodes the final image (--decoder tiny: faster, a slightly different picture)")

    def expected(self, plan, probe):
        return [planned_row("tiny decoder", plan.decoder == "tiny", plan.reasons["decoder"])]

    def apply(self, plan, models):
        """The final image's decoder for this run: the loaded tiny decoder decodes it or only draws the previews.
        A request for the tiny decoder where none is loaded is refused by name (ValidationError)."""
        from dataclasses import replace

        from ..schema import ValidationError
        from . import tiny_decoder

        final = plan.decoder == "tiny"
        for pipe in pipes(models):
            found = tiny_decoder.attached(pipe)
            if found is None and final and getattr(pipe, "vae", None) is not None:  # not a stand-in (tests)
                raise ValidationError("decoder", "tiny", "no tiny decoder is loaded beside this model (a "
                                                         "tiny-decoder/ folder beside it, or --tiny-decoder SOURCE)")
            if found is not None and found.final != final:
                tiny_decoder.attach(pipe, replace(found, final=final))

    def offers(self, models, source, settings):
        """``tiny_decoder``: one is loaded beside the model, or (nothing loaded) one will be: a tiny-decoder/
        folder beside it, --tiny-decoder, or --decoder tiny (TAESDXL)."""
        from . import tiny_decoder

        if models is not None:
            return {"tiny_decoder": tiny_decoder.attached(models.base) is not None}
        where, _ = tiny_decoder.locate(settings.tiny_decoder, source.location if source.kind == "folder" else None)
        return {"tiny_decoder": where != tiny_decoder.HUB_ID or settings.decoder == "tiny"}

    def live(self, live):
        from . import tiny_decoder

        found = tiny_decoder.attached(live.base)
        final = found is not None and found.final
        state = ("none loaded: previews by the latent approximation" if found is None else
                 f"{tiny_decoder.label(found.source)} ({type(found.decoder).__name__}) draws the previews"
                 + (" and decodes the final image" if final else ""))
        return [live_row("tiny decoder", final, live.plan.decoder == "tiny", live.plan.reasons["decoder"], state)]

    def check_settings(self, settings):
        from ..schema import ValidationError
        from .tiny_decoder import check_source

        problem = check_source(settings.tiny_decoder)
        if problem:
            raise ValidationError("tiny_decoder", settings.tiny_decoder, problem)

    def loaded(self, models, source, settings):
        """Load the tiny decoder onto the loaded pipelines; returns the log line.

        Required (ModelLoadError naming it when it cannot load) when the final image needs it (``--decoder tiny``)
        or ``--tiny-decoder`` names one; otherwise it is for the previews only, taken when it is on disk (a folder
        beside the model, TAESDXL in the Hugging Face cache) and never downloaded: without it previews stay
        approximate."""
        import os

        from diffusers.utils.torch_utils import get_module_execution_device

        from ..failures import ModelLoadError
        from . import tiny_decoder

        if getattr(models.base, "vae", None) is None:  # a stand-in pipeline (tests)
            return "tiny decoder: none (no VAE on this pipeline)"
        final = settings.decoder == "tiny"
        required = final or settings.tiny_decoder != "auto"
        if source.kind == "tiny" and not required:
            return "tiny decoder: none for the tiny test model (previews: latent approximation)"
        where, why = tiny_decoder.locate(settings.tiny_decoder, source.location if source.kind == "folder" else None)
        vae = models.base.vae
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        local_only = settings.local_files_only or offline or (not required and where == tiny_decoder.HUB_ID)
        try:
            decoder = tiny_decoder.load(where, vae.dtype, str(get_module_execution_device(vae)), local_only)
        except tiny_decoder.TinyDecoderError as exc:
            if required:
                raise ModelLoadError(f"{exc}; --decoder full decodes with the model's own VAE") from None
            return (f"tiny decoder: none on disk ({tiny_decoder.label(where)}: not found), previews use the latent "
                    "approximation")
        for pipe in pipes(models):
            tiny_decoder.attach(pipe, tiny_decoder.Attached(decoder, where, final))
        use = "previews and the final image" if final else "previews (the final image: the full VAE)"
        return f"tiny decoder {tiny_decoder.label(where)} ({why}) for the {use}"


UNITS = (FeatureCache(), GuidanceIntervalUnit(), TinyDecoder())
