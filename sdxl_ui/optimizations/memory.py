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


@dataclass(frozen=True)
class ModelSize:
    """What the memory estimate needs to know of a model: its parameter counts (read from its own files where it
    has them: ``sdxl_ui.weights.model_size``) and how its activations compare with SDXL's at the same size."""

    base_params: int  # every component of the base pipeline (UNet, both text encoders, VAE)
    refiner_params: int  # the refiner's own UNet (it shares text_encoder_2 and the VAE with the base)
    vae_params: int
    step_scale: float = 1.0  # a UNet step's working memory against SDXL's (activations follow the channel width)
    decode_scale: float = 1.0  # the VAE decode's against SDXL's
    how: str = "SDXL 1.0's published parameter counts"
    unet_params: int = SDXL_PARAMS["unet"]  # the biggest single model (what model offload must fit at once)

    @classmethod
    def counted(cls, unet: int, text_encoders: int, vae: int, refiner_unet: int, how: str) -> "ModelSize":
        """From counted parameters; activations scale with the channel width, i.e. with √(parameters)."""
        def width(n, reference):
            return min(1.0, max(0.02, (n / reference) ** 0.5)) if n else 1.0

        return cls(unet + text_encoders + vae, refiner_unet, vae, width(unet, SDXL_PARAMS["unet"]),
                   width(vae, SDXL_PARAMS["vae"]), how, unet)


SDXL_SIZE = ModelSize(sum(SDXL_PARAMS.values()), SDXL_REFINER_UNET_PARAMS, SDXL_PARAMS["vae"])
TINY_SIZE = ModelSize(2_000_000, 1_000_000, 0, 0.02, 0.02, "the tiny random model: a few MB", 1_000_000)


def as_size(model_kind) -> ModelSize:
    """A ModelSize as it is, or the one of ``tiny`` / ``sdxl`` (anything else named: SDXL's)."""
    if isinstance(model_kind, ModelSize):
        return model_kind
    return TINY_SIZE if model_kind == "tiny" else SDXL_SIZE


def estimate_memory(
    model_kind, dtype: str, vae_dtype: str, width: int, height: int, device: str, refiner: bool, tiled: bool
) -> MemoryEstimate:
    """``model_kind``: ``sdxl``, ``tiny`` or the model's own ModelSize (counted from its files)."""
    size = as_size(model_kind)
    base, refiner_params = size.base_params, size.refiner_params
    b = DTYPE_BYTES[dtype]
    megapixels = width * height / 1024**2
    weights = base * b / 1e9
    if vae_dtype != dtype:
        weights += size.vae_params * (DTYPE_BYTES[vae_dtype] - b) / 1e9
    scale = size.step_scale
    if device == "cpu":
        step = CPU_STEP_GB_PER_MP_FP32 * megapixels * b / 4 * scale
    else:
        step = GPU_STEP_GB_PER_MP * megapixels * b / 2 * scale
    vae_b = DTYPE_BYTES[vae_dtype]
    decode = (VAE_TILED_DECODE_GB_FP32 if tiled else VAE_DECODE_GB_PER_MP_FP32 * megapixels) * vae_b / 4 \
        * size.decode_scale
    refiner_gb = refiner_params * b / 1e9 if refiner else 0.0
    if device == "cuda":  # measured peak: weights + ~3 GB per megapixel (see GPU_WORK_GB_PER_MP)
        overhead = max(0.0, GPU_WORK_GB_PER_MP * megapixels * max(scale, size.decode_scale) - max(step, decode))
    else:
        overhead = RUNTIME_OVERHEAD_GB
    return MemoryEstimate(round(weights, 2), round(refiner_gb, 2), round(step, 2), round(decode, 2),
                          round(overhead, 2))

