"""The service's live state (issue 13, finding 5): the status panel reads the pipeline against the plan it was
last applied with; reconfigure() waits for a running generation; the VAE decode unscales as diffusers does."""
import threading

import torch
from tests.helpers import run

from sdxl_ui.models import build_tiny
from sdxl_ui.schema import GenerationRequest, ProgressEvent, ResultEvent
from sdxl_ui.service import GenerationService, decode_latents
from sdxl_ui.settings import AppSettings


def test_status_panel_reports_the_live_state_against_the_plan_that_made_it(tmp_path):
    """A request above 1536² turns VAE tiling on; the panel used to quote the load-time plan's reason beside it:
    "VAE tiling: active — not needed at 256×256"."""
    service = GenerationService(AppSettings(model="tiny", device="cpu", outputs=tmp_path))
    out = run(service, GenerationRequest(prompt="a fox", steps=1, width=1544, height=1544, seed=3))
    assert not out["errors"]
    rows = {row["name"]: row for row in service.status()["rows"]}
    tiling = rows["VAE tiling"]
    assert tiling["status"] == "active" and "above 1536²" in tiling["detail"]
    assert "not needed" not in tiling["detail"] and "not as planned" not in tiling["detail"]


def test_reconfigure_waits_for_the_running_generation(tmp_path):
    """reconfigure() used to drop the models and the plan between two steps of a running generation."""
    service = GenerationService(AppSettings(model="tiny", device="cpu", outputs=tmp_path))
    models, _ = service.ensure_loaded()
    unet_calls, at_return, started = [], [], threading.Event()
    models.base.unet.register_forward_hook(lambda *_: unet_calls.append(1) and None)

    def switch():
        started.wait(120)
        service.reconfigure(service.settings.with_(threads=1))
        at_return.append(len(unet_calls))

    switcher = threading.Thread(target=switch)
    switcher.start()
    results = []
    for event in service.generate(GenerationRequest(prompt="a fox", steps=40, width=128, height=128, seed=1)):
        if isinstance(event, ProgressEvent):  # the run holds the device now
            started.set()
        results += [event] if isinstance(event, ResultEvent) else []
    switcher.join(60)
    assert len(results) == 1 and results[0].steps_run == 28  # 40 → 28 on CPU, all of them run
    assert at_return == [len(unet_calls)] == [28]  # no step ran after reconfigure() returned
    assert service.settings.threads == 1 and not service.loaded


def test_decode_latents_uses_the_vae_latents_mean_and_std():
    """diffusers' SDXL pipeline denormalises with latents_mean/std when the VAE config has them (Playground v2.5);
    decode_latents divided by scaling_factor only."""
    base, _ = build_tiny(with_refiner=False)
    vae = base.vae
    vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[0.5, 0.6, 0.7, 0.8])
    seen = []
    vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decode_latents(base, latents)
    mean = torch.tensor([0.1, -0.2, 0.3, -0.4]).view(1, 4, 1, 1)
    std = torch.tensor([0.5, 0.6, 0.7, 0.8]).view(1, 4, 1, 1)
    assert torch.allclose(seen[0], latents * std / vae.config.scaling_factor + mean)
    # Without them: the plain scaling factor, as before.
    plain, _ = build_tiny(with_refiner=False)
    seen.clear()
    plain.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    with torch.inference_mode():
        decode_latents(plain, latents)
    assert torch.allclose(seen[0], latents / plain.vae.config.scaling_factor)
