"""``bench --prompt-chunks``: what each chunk of a long or weighted prompt costs — the text encoders' time for a
prompt of 1 to 4 chunks on the full SDXL text encoders (CLIP ViT-L and OpenCLIP bigG, random weights), in the
plan's dtype, through the same path a run takes (``long_prompts.conditioning``)."""
from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

CHUNKS = (1, 2, 3, 4)


def _encoders(torch, dtype, device):
    from ..assembly import CLIP_BIGG, CLIP_L, build_modules, clip_tokenizer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            modules = build_modules({"te1": CLIP_L, "te2": CLIP_BIGG})
    finally:
        torch.set_default_dtype(previous)
    tokenizer = clip_tokenizer()  # byte-level: one token per character
    return SimpleNamespace(tokenizer=tokenizer, tokenizer_2=tokenizer, text_encoder=modules["te1"].eval(),
                           text_encoder_2=modules["te2"].eval(), _execution_device=torch.device(device),
                           config=SimpleNamespace(force_zeros_for_empty_prompt=True))


def time_chunks(dtype_name: str, device: str = "cpu", repeats: int = 3) -> dict:
    """{chunks: best seconds of the prompt's encoding} and the seconds per extra chunk (least squares)."""
    import torch

    from ..long_prompts import conditioning

    pipe = _encoders(torch, getattr(torch, dtype_name), device)
    per = pipe.tokenizer.model_max_length - 2
    seconds = {}
    for n in CHUNKS:
        prompt = "(a:1.1)" + "b" * (per * n - 1)  # a weight: the embedding path even for one chunk
        conditioning(pipe, prompt, "")  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            found = conditioning(pipe, prompt, "")
            best = min(best, time.perf_counter() - start)
        assert found.chunks == n, (found.chunks, n)
        seconds[n] = round(best, 4)
    xs, ys = list(seconds), list(seconds.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"dtype": dtype_name, "device": device, "seconds": seconds, "per_chunk_s": round(slope, 4)}


def cmd_prompt_chunks(args, probe, plan) -> int:
    dtypes = list(dict.fromkeys([plan.dtype, "float32"]))
    found = [time_chunks(d, plan.device) for d in dtypes]
    machine = probe.cpu.model_name if plan.device == "cpu" else probe.cuda.device_name
    if args.json:
        print(json.dumps({"machine": machine, "results": found}, indent=1))
        return 0
    print(f"prompt chunks on the full SDXL text encoders (random weights), {plan.device} ({machine}):")
    print("| dtype | " + " | ".join(f"{n} chunk{'s' if n > 1 else ''}" for n in CHUNKS) + " | per extra chunk |")
    print("|---|" + "---|" * (len(CHUNKS) + 1))
    for r in found:
        print(f"| {r['dtype']} | " + " | ".join(f"{r['seconds'][n] * 1000:.0f} ms" for n in CHUNKS)
              + f" | {r['per_chunk_s'] * 1000:.0f} ms |")
    print("(the text encoders run once per prompt and phase, before the first step)", file=sys.stderr)
    return 0
