"""The bench's table: the figures of `summarize` as printed (also of a saved `bench --json`, by --from-json)."""
from __future__ import annotations

import re


def machine_label(probe, device) -> str:
    """The machine in the table's heading: the GPU and its memory, or the CPU, its cores and RAM."""
    if device == "cuda":
        return f"{probe.cuda.device_name} ({probe.cuda.vram_total_gb} GB)"
    return f"{probe.cpu.model_name}, {probe.cpu.physical_cores} cores, {probe.cpu.ram_total_gb:.0f} GB"


HQ_PARTS = (("base_s", "base"), ("refiner_s", "refiner"), ("refiner_and_decode_s", "refiner + decode"),
            ("decode_s", "decode"))


def op_dtypes(row: dict) -> str:
    """The dtype each operation class ran in, read from a configuration's saved report (stock: fp32 throughout)."""
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(row["dtype"], row["dtype"])
    rows = {r["name"]: r for r in row.get("report", ())}
    if not rows:
        return f"everything {short} (stock diffusers)"
    int8 = rows.get("int8 layers", {})
    linear = conv = short
    if int8.get("status") == "active":
        linear = "int8"
        convs = re.search(r"(\d+) convolutions int8", int8.get("detail", ""))
        conv = f"int8 ({convs.group(1)} of them, the rest {short})" if convs else "int8"
    vae = re.search(r"(\w+) VAE", rows.get("precision", {}).get("detail", ""))
    layout = " channels-last" if rows.get("channels-last VAE", {}).get("status") == "active" else ""
    return (f"linear layers {linear}, convolutions {conv}, attention {short} (SDPA), "
            f"VAE {vae.group(1) if vae else short}{layout}")


def format_table(s: dict) -> str:
    """The summary as a text table with the ratios, the High-quality image, step kinds and per-image figures."""
    rows = [r for k, r in s.items() if isinstance(r, dict) and "matmul_peak_gflops" in r]
    head = (f"SDXL {s['arch']} architecture on {s['machine']} ({s['device']}), torch {s['torch']}, "
            f"{s['res']}², {s['date']}")
    lines = [head, "",
             f"{'config':<10} {'dtype':<9} {'s/step':>8} {'TFLOP':>6} {'GFLOP/s':>8} {'peak':>7} {'%':>5} "
             f"{'text s':>7} {'VAE s':>6} {'RSS step':>8} {'RSS all':>7} {'HQ 1024² s':>10} {'warm-up s':>9}"]
    for r in rows:
        lines.append(f"{r['kind']:<10} {r['dtype']:<9} {r['s_per_step']:>8.3f} {r['unet_tflop_per_step']:>6.2f} "
                     f"{r['gflops']:>8.1f} {r['matmul_peak_gflops']:>7.1f} {r['pct_of_peak']:>5.1f} "
                     f"{r['text_encode_s']:>7.2f} {r['vae_decode_s']:>6.2f} {r['peak_rss_step_gb']:>8.2f} "
                     f"{r['peak_rss_gb']:>7.2f} "
                     f"{r['projected_1024_hq_s']:>10.1f} {r['warmup_s']:>9.1f}")
        if "peak_vram_gb" in r:
            lines[-1] += f"  VRAM {r['peak_vram_gb']} GB"
        if "compile_cache" in r:
            c = r["compile_cache"]
            lines[-1] += (f"  ({c['graphs_before']} compiled graphs kept in {c['dir']} before its warm-up"
                          f"{'; freezing' if c.get('freezing') else ''})")
    if "ratio" in s:
        lines += ["", f"per guided step, plan vs stock diffusers (baseline s/step ÷ plan s/step): {s['ratio']}×",
                  f"per 1024² High-quality image (projected, stock 50 steps vs plan's steps policy): "
                  f"{s['image_ratio']}×"]
    hq_rows = [r for r in rows if "hq" in r]
    if hq_rows:
        lines += ["", f"High-quality image at {s['res']}², measured end to end (second of two runs):"]
        for r in hq_rows:
            h = r["hq"]
            parts = [f"{name} {h[key]:.2f} s" for key, name in HQ_PARTS if key in h]
            lines.append(f"{r['kind']:<10} {h['total_s']:>8.2f} s  ({h['steps']} steps, refiner "
                         f"{'on' if h['refiner'] else 'off'}: {', '.join(parts)})")
        if "hq_ratio" in s:
            lines.append(f"High-quality image, stock ÷ plan: {s['hq_ratio']}×")
    lines += ["", "dtype per operation class:"] + [f"   {r['kind']:<10} {op_dtypes(r)}" for r in rows]
    if "dtype_peaks" in s:
        peaks = s["dtype_peaks"]
        lines += ["", "This host's GEMM (probe): " + ", ".join(f"{k} {v:g}" for k, v in peaks["gflops"].items())
                  + f" GFLOP/s (int8: GOP/s), {peaks['how']}"]
    if "presets" in s:
        kinds = s["plan"]["kinds"]
        lines += ["", f"Step kinds at {s['res']}² ({s['plan']['dtype']}, median of 3): " + ", ".join(
            f"{k.replace('_', ' ')} {v:.3f} s" for k, v in kinds.items())]
        lines.append("Per 1024² image (UNet steps FLOP-scaled from the step kinds, + text encoding + decode):")
        for name, p in s["presets"].items():
            what = p.get("what") or (f"{p['steps']} steps {p['sampler']}, "
                                     + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in p["counts"].items()))
            lines.append(f"   {name:<10} {p['image_s']:>9.2f} s" + (f"  {p['ratio']:>6.2f}× stock" if "ratio" in p
                                                                       else "          ") + f"  ({what})"
                         + (f"; {p['vs_peer']:.2f}× its peer" if "vs_peer" in p else ""))
    if "decode_1024" in s:
        d = s["decode_1024"]
        lines.append(f"decode per 1024² image: full VAE {d['full_vae_s']:.3f} s"
                     + (f", tiny decoder {d['tiny_decoder_s']:.3f} s" if "tiny_decoder_s" in d else ""))
    if "check" in s:
        c = s["check"]
        lines.append(f"Check: one real Fast image at {c['res']}², {c['steps']} steps: measured {c['measured_s']} s, "
                     f"computed {c['computed_s']} s ({c['error_pct']:+.1f} %, "
                     f"{'within' if c['within_10_pct'] else 'NOT within'} 10 %)")
    if "int8_step" in s:
        i = s["int8_step"]
        lines.append(f"int8 (opt-in): {i['s_per_step']:.3f} s per guided step, {i['ratio_vs_stock_fp32']}× stock fp32"
                     + (f", {i['ratio_vs_plan']}× the plan's step" if i.get("ratio_vs_plan") else "")
                     + f"; noise prediction {100 * i['noise_pred_rel_rms_diff']:.2f} % RMS from exact")
    lines.append("HQ 1024² = steps (stock: 50; plan: its steps policy) × FLOP-scaled step time + text encoding + "
                 "FLOP-scaled decode")
    if "tiny_decoder_s" in s.get("decode_1024", {}):
        lines.append("tiny decoder = diffusers' AutoencoderTiny, default config (TAESDXL's architecture), random "
                     "weights, in the plan's dtype; its decode at the bench size scaled to 1024² by the pixel ratio "
                     "(its cost is linear in pixels)")
    lines.append("RSS step = peak RSS through text encoding and UNet steps; RSS all = including the VAE decode")
    return "\n".join(lines)
