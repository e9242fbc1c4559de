"""``bench --pictures``: image to image and the hires fix on the full SDXL architecture (random weights), per image
at ``--res`` (1024²), end to end through the service's own kinds of run with the LCM profile's 4-step schedule,
beside text to image at that size; then stock diffusers in fp32 doing the same work (the same 4 LCM steps, the
full VAE) in a process of its own; and the RAM the kinds of run add over the loaded base (their pipelines share
its modules)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

PROMPT = "a photograph of a red fox in the snow, golden hour, highly detailed"
STRENGTH = 0.5
STEPS = 4


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def ours(res: int) -> dict:
    """The service's kinds of run on the full architecture, the plan's techniques, the LCM profile's 4 steps."""
    from PIL import Image

    from ..edits import HiresFix
    from ..jobs import collect
    from ..models import ModelSource
    from ..schema import GenerationRequest
    from ..selftest import full_loader
    from ..service import GenerationService
    from ..settings import AppSettings

    settings = AppSettings(model="selftest-sdxl-random", profile="lcm", device="cpu",
                           outputs=tempfile.mkdtemp(prefix="sdxl-ui-bench-"))
    service = GenerationService(settings, source=ModelSource("bench", "sdxl-architecture-random"),
                                loader=full_loader("cpu"))
    rss = {"start_mib": round(_rss_mib())}
    service.host.ensure_loaded()
    rss["loaded_mib"] = round(_rss_mib())
    rows = {}

    def timed(name, **fields):
        t = time.perf_counter()
        got = collect(service.generate(GenerationRequest(prompt=PROMPT, seed=0, **fields)))
        if got.error is not None:
            raise RuntimeError(f"{name}: {got.error.message}")
        result = got.results[-1]
        rows[name] = {"seconds": round(time.perf_counter() - t, 1), "steps_run": result.steps_run,
                      "size": list(result.image.size), "dtype": result.dtype}
        print(f"PROGRESS ours {name}: {rows[name]}", file=sys.stderr, flush=True)
        return result.image

    timed("warm-up 256²", width=256, height=256)
    rows.pop("warm-up 256²")
    picture = timed(f"text to image {res}²", width=res, height=res)
    rss["after_txt2img_mib"] = round(_rss_mib())
    timed(f"image to image {res}², strength {STRENGTH:g}", init_image=picture, strength=STRENGTH)
    rss["after_img2img_mib"] = round(_rss_mib())
    timed(f"hires fix {res // 2}² → {res}², Lanczos, strength {STRENGTH:g}", width=res // 2, height=res // 2,
          hires=HiresFix(scale=2, upscaler="Lanczos", strength=STRENGTH))
    rss["after_hires_mib"] = round(_rss_mib())
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (res // 4, res // 4, 3 * res // 4, 3 * res // 4))
    timed(f"inpaint {res}² (centre quarter), strength {STRENGTH:g}", init_image=picture, mask=mask,
          strength=STRENGTH)
    rss["after_inpaint_mib"] = round(_rss_mib())
    return {"rows": rows, "rss": rss}


def stock(res: int) -> dict:
    """Stock diffusers, fp32, the same work: LCMScheduler, 4 steps, guidance 1, the full VAE."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from ..assembly import build_full

    base, _ = build_full(torch, torch.float32, "cpu", with_refiner=False)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    common = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=1.0)
    rows = {}

    def timed(name, fn):
        t = time.perf_counter()
        image = fn(torch.Generator("cpu").manual_seed(0))
        rows[name] = {"seconds": round(time.perf_counter() - t, 1), "size": list(image.size), "dtype": "float32"}
        print(f"PROGRESS stock {name}: {rows[name]}", file=sys.stderr, flush=True)
        return image

    with torch.inference_mode():
        timed("warm-up 256²", lambda g: base(width=256, height=256, generator=g, **common).images[0])
        rows.pop("warm-up 256²")
        picture = timed(f"text to image {res}²", lambda g: base(width=res, height=res, generator=g,
                                                                **common).images[0])
        timed(f"image to image {res}², strength {STRENGTH:g}",
              lambda g: img2img(image=picture, strength=STRENGTH, generator=g, **common).images[0])

        def hires(g):
            first = base(width=res // 2, height=res // 2, generator=g, **common).images[0]
            return img2img(image=first.resize((res, res), Image.LANCZOS), strength=STRENGTH, generator=g,
                           **common).images[0]

        timed(f"hires fix {res // 2}² → {res}², Lanczos, strength {STRENGTH:g}", hires)
    return {"rows": rows}


def child(kind: str, res: int) -> dict:
    """One side in a process of its own (the fp32 and the plan's models never share the RAM)."""
    done = subprocess.run([sys.executable, "-m", "sdxl_ui.bench.pictures", kind, str(res)], stdout=subprocess.PIPE,
                          text=True)
    if done.returncode:
        return {"error": f"the {kind} process exited {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_pictures(res: int, only: str = "both") -> dict:
    """Both sides and the speed-up of each row."""
    out = {"res": res, "profile": "lcm (4 steps)", "strength": STRENGTH}
    for side in ("ours", "stock"):
        if only in ("both", "plan" if side == "ours" else "baseline"):
            out[side] = child(side, res)
    ours_rows, stock_rows = out.get("ours", {}).get("rows", {}), out.get("stock", {}).get("rows", {})
    out["speedup"] = {name: round(stock_rows[name]["seconds"] / row["seconds"], 2) for name, row in
                      ours_rows.items() if name in stock_rows and row["seconds"]}
    return out


def table(out: dict) -> str:
    lines = [f"Pictures from pictures, full SDXL architecture (random weights), LCM 4 steps, per image:",
             f"{'row':<52} {'stock fp32 s':>12} {'ours s':>8} {'×':>6}"]
    ours_rows, stock_rows = out.get("ours", {}).get("rows", {}), out.get("stock", {}).get("rows", {})
    for name in dict.fromkeys([*stock_rows, *ours_rows]):
        s, o = stock_rows.get(name, {}).get("seconds"), ours_rows.get(name, {}).get("seconds")
        lines.append(f"{name:<52} {s if s is not None else '—':>12} {o if o is not None else '—':>8} "
                     f"{out['speedup'].get(name, '—'):>6}")
    rss = out.get("ours", {}).get("rss")
    if rss:
        lines.append("RSS MiB: " + ", ".join(f"{k.removesuffix('_mib')} {v}" for k, v in rss.items()))
    return "\n".join(lines)


def cmd_pictures(args, probe) -> int:
    """``bench --pictures``: the table (or ``--json``), the CPU named; 1 when a side failed."""
    out = run_pictures(args.res, args.only)
    out["machine"] = probe.cpu.model_name
    print(json.dumps(out) if args.json else f"{table(out)}\n(on {probe.cpu.model_name})")
    return 0 if "error" not in out.get("ours", {}) and "error" not in out.get("stock", {}) else 1


if __name__ == "__main__":
    side, size = sys.argv[1], int(sys.argv[2])
    print(json.dumps(ours(size) if side == "ours" else stock(size)))
