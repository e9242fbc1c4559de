"""`python -m sdxl_ui bench`: the full SDXL base architecture (random weights, no download), stock diffusers
against this project's plan, in one run.

Each configuration runs in its own child process, built directly in its dtype: its peak RSS is its own
(ru_maxrss of that process), and the fp32 baseline's ~14 GB are gone before the plan is built.
Timed per configuration: guided UNet step (batch 2, best of --steps after one warm-up step), text encoding,
VAE decode; UNet FLOPs come from torch's FlopCounterMode on a meta-device copy (no compute needed).

The parts: `build` (models, inputs, FLOP counts), `timing` (one configuration, in a child process),
`schedules` (a preset's real schedule and the per-image arithmetic), `report` (the table), `command`
(`cmd_bench`). Their public names are re-exported here.
"""
from .build import (CLIP_BIGG, CLIP_L, EXPECTED_PARAMS, EXPECTED_REFINER_UNET_PARAMS, PROMPT,  # noqa: F401
                    SDXL_REFINER_UNET, SDXL_UNET, SDXL_VAE, build_full, build_tiny_arch, matmul_peak_gflops,
                    param_counts, sync, tiny_unet_config, unet_inputs, unet_tflops, vae_decode_tflops)
from .command import PLAN_FLAGS, cmd_bench  # noqa: F401
from .report import HQ_PARTS, format_table, machine_label  # noqa: F401
from .schedules import (KIND_NAMES, STOCK_STEPS, CallRecorder, check_figures, per_image,  # noqa: F401
                        preset_schedule, schedule_calls, schedule_seconds, summarize)
from .timing import HQ_GUIDANCE, HQ_STEPS, child_main, run_child, run_configuration  # noqa: F401
