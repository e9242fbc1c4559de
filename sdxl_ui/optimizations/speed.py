"""How fast each step runs: the steps policy, CPU threads, torch.compile, and the scheduler row (the request
picks the sampler)."""
from __future__ import annotations

import os
from pathlib import Path

from ..profiles import profile_named
from ..samplers import SAMPLER_LABELS
from ..schema import PRESETS, OptimizationRow, Status
from .profile import family
from ..settings import Toggle, cache_root
from .base import REQUIRED, Switch, Unit, is_compiled, live_row, planned_row

CPU_STEPS_FACTOR = 0.7  # the seed: 50 -> 35 on CPU


def keep_compiled_graphs(env=None) -> Path:
    """Point inductor's on-disk caches (its FX graph and AOT autograd caches, on by default) at sdxl_ui's cache root
    instead of /tmp, so that a later start loads the compiled graphs instead of compiling them again; a
    TORCHINDUCTOR_CACHE_DIR the user set wins. Inductor writes its /tmp default into that variable the first time
    anything asks for its folder, so that value does not count as the user's. Returns the folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env = os.environ if env is None else env
    chosen = env.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        chosen = env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root(env) / "inductor")
    return Path(chosen)


def compile_unet(torch, unet, device: str, int8: bool = False):
    """torch.compile the UNet as the plan does: on a CPU, with inductor's freezing for an exact (not int8) UNet —
    its weights become constants, which lets oneDNN take them prepacked (a 2-core AMX Xeon, one 1024² pass: eager
    6.24 s, compiled 5.61–5.77 s, compiled with freezing 4.91–5.27 s); the graphs go to sdxl_ui's cache root."""
    keep_compiled_graphs()
    freeze = device == "cpu" and not int8
    return torch.compile(unet, options={"freezing": True} if freeze else None), freeze


class Compile(Unit):
    key, rows = "compile", ("torch.compile",)
    fields = {"compile": False}
    decide_at, apply_at, row_at = 120, 90, 90

    def decide(self, ctx):
        ctx.values["compile"] = ctx.settings.compile
        if ctx.settings.compile:
            ctx.reasons["compile"] = (
                "on (--compile): inductor compiles the UNet at the first step, on a CPU with freezing (the weights as "
                "constants, prepacked for oneDNN), and keeps the graphs on disk. A 2-core AMX Xeon, one 1024² pass: "
                "6.24 s eager → 4.91–5.27 s (5.61–5.77 s without freezing); first start 121–148 s of compiling, "
                "a later start ~105 s (21 s without freezing). H200: 159 s once, then 77 → 56 ms per step")
        else:
            ctx.reasons["compile"] = ("off: the first start compiles for minutes; later steps take 6–21 % less time "
                                      "on a 2-core AMX Xeon (3 % on the EPYC, measured without freezing), ~27 % on an "
                                      "H200; use --compile for long-running servers")

    def apply(self, plan, models):
        if plan.compile and not is_compiled(models.base.unet):
            import torch

            # Compiled lazily: the first step pays the compilation (reported as warm-up in the log and bench).
            models.base.unet, _ = compile_unet(torch, models.base.unet, plan.device, plan.int8)

    def expected(self, plan, probe):
        return [planned_row("torch.compile", plan.compile, plan.reasons["compile"])]

    def live(self, live):
        compiled = is_compiled(live.base.unet)
        kept = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        return [live_row("torch.compile", compiled, live.plan.compile, live.plan.reasons["compile"],
                         f"compiled graphs kept in {kept} (a later start loads them)" if compiled and kept else "")]


class SchedulerRow(Unit):
    """No decision of the plan: the request picks the sampler (its quality preset's, or Advanced)."""

    rows = ("scheduler",)
    row_at = 100

    def expected(self, plan, probe):
        return [OptimizationRow("scheduler", Status.ACTIVE,
                                "per request: " + "; ".join(f"{q.value}: {SAMPLER_LABELS[p.scheduler]}, {p.steps} steps"
                                                            for q, p in PRESETS.items()) + " (any sampler can be picked per request)")]

    def live(self, live):
        return [OptimizationRow("scheduler", Status.ACTIVE, type(live.base.scheduler).__name__)]


class Steps(Unit):
    key, rows = "steps_factor", ("steps policy",)
    fields = {"steps_factor": REQUIRED, "steps_policy": REQUIRED}  # steps_policy: the request's switch, as decided
    decide_at, row_at = 90, 110
    switch = Switch("steps_policy", "Steps policy (auto: × 0.7 on CPU; off: the steps as asked)",
                    "the CPU steps policy, × 0.7 (auto: on CPU; off: run the steps as asked)")
    per_request = ("steps_factor", "steps_policy")

    def decide(self, ctx):
        prof = family(ctx)
        ctx.values["steps_policy"] = ctx.switch("steps_policy").value
        if ctx.switch("steps_policy") is Toggle.OFF:
            ctx.values["steps_factor"] = 1.0
            ctx.reasons["steps_factor"] = "off for this request: its steps as asked"
        elif ctx.device == "cpu" and prof.few_step:
            # A distilled schedule is its step count: Lightning-4 has 4 trailing timesteps, × 0.7 would run 3 of a
            # schedule no checkpoint was distilled for; Turbo/LCM at 1-8 steps have nothing left to cut.
            ctx.values["steps_factor"] = 1.0
            ctx.reasons["steps_factor"] = (f"CPU, but {prof.label} runs the step counts it was distilled for "
                                           f"({'/'.join(map(str, prof.steps))}); × 0.7 would leave its schedule")
        elif ctx.device == "cpu":
            ctx.values["steps_factor"] = CPU_STEPS_FACTOR
            ctx.reasons["steps_factor"] = "CPU: steps × 0.7 (the seed's policy, e.g. 50 → 35)"
        else:
            ctx.values["steps_factor"] = 1.0
            ctx.reasons["steps_factor"] = f"{ctx.device.upper()}: steps as requested"

    def expected(self, plan, probe):
        return [self._row(plan)]

    def live(self, live):
        return [self._row(live.plan)]

    @staticmethod
    def _row(plan):
        factor = plan.steps_factor
        prof = profile_named(plan.profile)
        n = prof.steps[0] if prof.few_step else 50
        return OptimizationRow("steps policy", Status.ACTIVE if factor != 1.0 else Status.OFF,
                               f"× {factor:g} ({n} → {plan.steps_for(n)}) — {plan.reasons['steps_factor']}")


class Threads(Unit):
    key, rows = "threads", ("CPU threads",)
    fields = {"threads": REQUIRED}
    decide_at, apply_at, row_at = 100, 10, 140

    def decide(self, ctx):
        if ctx.device == "cpu":
            threads = ctx.settings.threads or ctx.probe.cpu.physical_cores
            ctx.reasons["threads"] = (f"forced to {threads}" if ctx.settings.threads
                                      else f"{threads} = physical cores (SMT siblings share the same AVX-512 units)")
        else:
            threads = None
            ctx.reasons["threads"] = "torch default (the GPU does the work)"
        ctx.values["threads"] = threads

    def apply(self, plan, models):
        if plan.threads:
            import torch

            torch.set_num_threads(plan.threads)

    def expected(self, plan, probe):
        return [OptimizationRow("CPU threads", Status.ACTIVE if plan.device == "cpu" else Status.NOT_APPLICABLE,
                                f"{plan.threads or 'default'} — {plan.reasons['threads']}")]

    def live(self, live):
        import torch

        return [OptimizationRow("CPU threads",
                                Status.ACTIVE if live.device_type == "cpu" else Status.NOT_APPLICABLE,
                                f"torch uses {torch.get_num_threads()} — {live.plan.reasons['threads']}")]


UNITS = (Steps(), Threads(), Compile(), SchedulerRow())
