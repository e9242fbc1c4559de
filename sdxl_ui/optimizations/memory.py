"""Memory: the SDXL components' sizes and the estimate of what a plan needs (weights, a step, the decode).

Pure arithmetic (no torch); every figure's source is beside it (PERFORMANCE-ANCHORS.md)."""
from __future__ import annotations

from dataclasses import dataclass


# Exact parameter counts of the SDXL 1.0 components (PERFORMANCE-ANCHORS.md).
SDXL_PARAMS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}
SDXL_REFINER_UNET_PARAMS = 2_259_526_660
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Working memory on top of the weights, per megapixel, measured or derived:
# - GPU: H200 fp16 SDPA 1024² peak 10.0 GiB with 6.9 GB of weights -> ~3 GB (allocator, cuBLAS workspace,
#   fp32 VAE decode). A UNet step alone needs ~1.5 GB of that (SDPA never materialises the attention matrix).
# - CPU: bf16 activations of a guided step at 1024² stay under 1 GB with SDPA; the VAE decoder's
#   128-channel 1024² feature maps (0.5 GB each in fp32) dominate at the end.
GPU_WORK_GB_PER_MP = 3.0
GPU_STEP_GB_PER_MP = 1.5
CPU_STEP_GB_PER_MP_FP32 = 1.6
VAE_DECODE_GB_PER_MP_FP32 = 2.5
VAE_TILE_PX = 512  # tile edge for tiled decode (the SDXL VAE's own default, 1024, would never tile ≤ 1024²)
VAE_TILED_DECODE_GB_FP32 = 0.7  # 512² tiles, whatever the image size
RUNTIME_OVERHEAD_GB = 0.8  # python, torch, tokenizers, the app
OFFLOAD_MARGIN = 1.10


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gb: float
    refiner_gb: float
    step_gb: float  # one guided UNet step
    decode_gb: float  # the VAE decode
    overhead_gb: float  # runtime / allocator overhead on top of the larger of step and decode

    @property
    def total_gb(self) -> float:
        return round(self.weights_gb + self.refiner_gb + max(self.step_gb, self.decode_gb) + self.overhead_gb, 2)


def model_param_count(model_kind: str) -> tuple[int, int]:
    """(base pipeline parameters, extra refiner UNet parameters) for ``sdxl`` or ``tiny``."""
    if model_kind == "tiny":
        return 2_000_000, 1_000_000  # a few MB: never the limiting factor
    return sum(SDXL_PARAMS.values()), SDXL_REFINER_UNET_PARAMS


def estimate_memory(
    model_kind: str, dtype: str, vae_dtype: str, width: int, height: int, device: str, refiner: bool, tiled: bool
) -> MemoryEstimate:
    base, refiner_params = model_param_count(model_kind)
    b = DTYPE_BYTES[dtype]
    megapixels = width * height / 1024**2
    weights = base * b / 1e9
    if vae_dtype != dtype:
        weights += SDXL_PARAMS["vae"] * (DTYPE_BYTES[vae_dtype] - b) / 1e9 if model_kind != "tiny" else 0.0
    scale = 0.02 if model_kind == "tiny" else 1.0
    if device == "cpu":
        step = CPU_STEP_GB_PER_MP_FP32 * megapixels * b / 4 * scale
    else:
        step = GPU_STEP_GB_PER_MP * megapixels * b / 2 * scale
    vae_b = DTYPE_BYTES[vae_dtype]
    decode = (VAE_TILED_DECODE_GB_FP32 if tiled else VAE_DECODE_GB_PER_MP_FP32 * megapixels) * vae_b / 4 * scale
    refiner_gb = refiner_params * b / 1e9 if refiner else 0.0
    if device == "cuda":  # measured peak: weights + ~3 GB per megapixel (see GPU_WORK_GB_PER_MP)
        overhead = max(0.0, GPU_WORK_GB_PER_MP * megapixels * scale - max(step, decode))
    else:
        overhead = RUNTIME_OVERHEAD_GB
    return MemoryEstimate(round(weights, 2), round(refiner_gb, 2), round(step, 2), round(decode, 2),
                          round(overhead, 2))

