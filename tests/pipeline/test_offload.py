"""Model offload with the refiner, and Stop, checked on a CPU host with accelerate's real hooks.

The accelerator is a recording stand-in: the execution device is ``cpu:0`` (real CPU memory, so the pipelines
really run), every ``.to()`` of a pipeline component is recorded, and accelerate's "where is this module" check
(the device of its first parameter) reads the recorded place. So accelerate's CpuOffload hooks and diffusers'
enable_model_cpu_offload / maybe_free_model_hooks do exactly what they do on a GPU, and the test sees which models
would be resident on the GPU at every forward.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.helpers import load_probe, run

from sdxl_ui.schema import ErrorKind, GenerationRequest
from sdxl_ui.service import CancelToken, GenerationService
from sdxl_ui.settings import AppSettings

STANDIN = torch.device("cpu", 0)  # the stand-in accelerator: "cpu:0" is not "cpu" to torch.device equality


def offload_owner(module, models) -> str | None:
    """'base' / 'refiner': whose offload chain the accelerate hook on ``module`` belongs to (None: no hook)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for name in ("base", "refiner"):
        pipe = getattr(models, name)
        if any(getattr(h, "hook", None) is hook for h in getattr(pipe, "_all_hooks", ())):
            return name
    return "other"


class RecordingDevice:
    """Records where each pipeline component is: 'gpu' after ``.to(cpu:0)``, 'cpu' after ``.to('cpu')``."""

    def __init__(self, monkeypatch, modules: dict):
        self.names = {id(m): n for n, m in modules.items()}
        self.where = {n: "cpu" for n in modules}
        real_to = torch.nn.Module.to

        def to(module, *args, **kwargs):
            out = real_to(module, *args, **kwargs)
            name = self.names.get(id(module))
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if name is not None and device is not None:
                self.where[name] = "gpu" if device == STANDIN else "cpu"
            return out

        monkeypatch.setattr(torch.nn.Module, "to", to)
        for name, module in modules.items():
            # accelerate's CpuOffload.pre_forward: `next(module.parameters()).device` tells where a module is.
            def parameters(recurse=True, _module=module, _name=name):
                place = "meta" if self.where[_name] == "gpu" else "cpu"  # meta: "not on the CPU"
                yield torch.empty(0, device=place, dtype=next(torch.nn.Module.parameters(_module)).dtype)
                yield from torch.nn.Module.parameters(_module, recurse)

            monkeypatch.setattr(module, "parameters", parameters, raising=False)

    def resident(self) -> set[str]:
        return {n for n, w in self.where.items() if w == "gpu"}


@pytest.fixture
def offloaded(monkeypatch, tmp_path):
    """A loaded tiny service whose plan is model offload + refiner on the stand-in accelerator."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    # Without an explicit device diffusers picks the accelerator itself (and refuses on a CPU host).
    monkeypatch.setattr(pipeline_utils, "get_device", lambda: str(STANDIN))
    probe = load_probe("laptop_rtx4060_8gb")  # an 8 GB GPU: the tier that runs model offload with the refiner
    settings = AppSettings(model="tiny", use_refiner="on", offload="model", outputs=tmp_path)
    service = GenerationService(settings, probe=probe)
    plan = service.plan
    assert (plan.device, plan.offload, plan.refiner) == ("cuda", "model", True)
    # The same plan on the stand-in device, in fp32 (CPU kernels); set before loading, as the service would.
    service.host._plan = dataclasses.replace(plan, device=str(STANDIN), dtype="float32", vae_dtype="float32")
    models, _ = service.ensure_loaded()
    base, refiner = models.base, models.refiner
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae  # shared, as loaded
    modules = {"text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2, "unet": base.unet,
               "refiner.unet": refiner.unet, "vae": base.vae}
    rec = RecordingDevice(monkeypatch, modules)
    seen: list[tuple[str, set[str], str | None]] = []  # (module, resident during its forward, hook owner)

    def watch(name, module, hooked):
        def hook(mod, args, output):
            seen.append((name, rec.resident(), offload_owner(hooked, models)))
        return module.register_forward_hook(hook)

    for name, module in modules.items():
        # The VAE runs through vae.decode (not forward): watch its decoder, which runs after the VAE's hook.
        watch(name, module.decoder if name == "vae" else module, module)
    return service, models, rec, seen


def request(steps=10):
    return GenerationRequest(prompt="a red fox", steps=steps, width=128, height=128, seed=1)


def check_run(seen, rec):
    """At every forward only the running model is on the accelerator, run under its own pipeline's hook chain;
    after the run nothing is."""
    expected_owner = {"text_encoder": "base", "unet": "base", "refiner.unet": "refiner"}
    problems = []
    for name, resident, owner in seen:
        if resident != {name}:
            problems.append(f"during {name}: resident {sorted(resident)}")
        if name in expected_owner and owner != expected_owner[name]:
            problems.append(f"{name} ran with a hook of {owner}")
    if rec.resident():
        problems.append(f"after the run: resident {sorted(rec.resident())}")
    return problems


def test_model_offload_with_refiner_keeps_one_model_resident_per_step(offloaded):
    service, models, rec, seen = offloaded
    for _ in range(2):  # the first run (hooks as apply() left them) and a later one (as the last run left them)
        seen.clear()
        out = run(service, request())
        assert not out["errors"] and len(out["results"]) == 1
        assert {name for name, _, _ in seen} == {"text_encoder", "text_encoder_2", "unet", "refiner.unet", "vae"}
        assert check_run(seen, rec) == []
    rep = out["results"][0].report
    assert rep.get("CPU offload").status.value == "active" and "model offload hooks" in rep.get("CPU offload").detail
    assert rep.get("Refinement").status.value == "active"


@pytest.mark.parametrize("stop_at_unet_call", [2, 9])  # 2: in the base stage; 9: in the refiner stage
def test_stop_frees_the_accelerator_and_the_next_run_works(offloaded, stop_at_unet_call):
    """Stop must end the loop through the pipeline (``_interrupt``), so diffusers' maybe_free_model_hooks() runs:
    raising out of the step callback left the UNet on the GPU."""
    service, models, rec, seen = offloaded
    token, calls = CancelToken(), []

    def count(*_):  # the user presses Stop while this UNet call runs
        calls.append(1)
        if len(calls) == stop_at_unet_call:
            token.cancel()

    for unet in (models.base.unet, models.refiner.unet):
        unet.register_forward_hook(count)
    out = run(service, request(), cancel=token)
    assert [e.kind for e in out["errors"]] == [ErrorKind.CANCELLED] and not out["results"]
    assert len(calls) == stop_at_unet_call  # the pipeline skipped its remaining steps
    assert rec.resident() == set(), f"resident after Stop: {sorted(rec.resident())}"
    seen.clear()
    out = run(service, request())
    assert not out["errors"] and len(out["results"]) == 1
    assert check_run(seen, rec) == []

