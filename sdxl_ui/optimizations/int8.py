"""Int8 linear layers and convolutions for the UNet on CPUs whose int8 GEMM beats their best float GEMM.

Linear layers are our own (``torch._int_mm``, below); convolutions are oneDNN's quantized convolution
(``Int8Conv2d``, further down: per-tensor dynamic activations, output written in the input's float dtype).

On CPUs with VNNI / AMX-INT8, ``torch._int_mm`` (int8 × int8 → int32) runs at about twice the speed of a bf16
matmul (2-core Zen 4: fp32 168 GFLOP/s, bf16 408, int8 878 GOP/s at 2048²). The SDXL UNet spends most of its
time in ``nn.Linear`` (attention projections and feed-forward), so those are the layers worth converting:

* **weights**: symmetric int8 per output channel, quantized once: ``w ≈ q_w[o, :] · s_w[o]`` with
  ``s_w[o] = max|w[o, :]| / 127``; stored transposed and contiguous, (in, out), as ``torch._int_mm`` takes it.
  Scales stay fp32 (also after ``module.to(dtype)``); the bias keeps the model's float dtype.
* **activations**: dynamic symmetric int8 per row (per token) over the last dim: ``x ≈ q_x[r, :] · s_x[r]``
  with ``s_x[r] = max|x[r, :]| / 127``, computed on every call (no calibration). A row of zeros gets scale 1
  (not 0), so it quantizes to zeros and the output row is just the bias.
* **output**: ``(q_x @ q_w)`` in int32 (exact; no overflow below k ≈ 133 000 input features), then
  ``· s_x[r] · s_w[o]`` in fp32, ``+ bias``, returned in the input's dtype and shape.

Error (justification of the test bounds): rounding to a step ``Δ = max / 127`` adds uniform noise of RMS
``Δ/√12``. For Gaussian rows of k features ``max ≈ σ·√(2 ln k)`` (≈ 3.8 σ at k = 1280), so each operand carries
≈ 0.9 % relative RMS noise, and the product ≈ 1.2 % (the two add in quadrature); uniform (Kaiming-initialised)
weights are better (≈ 0.45 %). Outliers in a row raise ``Δ`` for the whole row: that is the price of per-row
dynamic scaling, and why the option is opt-in.

``torch._int_mm`` on CPU (torch 2.13) takes any shape (m = 1, 77; k, n not multiples of 8: checked by
experiment); other builds/devices are stricter (CUDA wants m > 16 and k, n multiples of 8). A call it refuses
falls back to a float matmul with the dequantized weight, counted in ``Int8Linear.fallbacks`` and
``state(module)["fallbacks"]``, so a silent slow path shows up in the report.

    counts = quantize_linears(pipe.unet, min_features=256)   # {"quantized": 700, "skipped": 12, ...}
    state(pipe.unet)                                           # read back from the live modules

Quantize after LoRAs are fused (a PEFT LoRA wrapper loaded afterwards would not recognise ``Int8Linear``).
Converting back (``dequantize_linears``) gives float layers with the *rounded* weights: to return to the
original model exactly, reload it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

MARKER = "_sdxl_ui_int8"  # attribute set on the module given to quantize_linears: the counts of that call
QMAX = 127  # symmetric: -127..127, so that q and -q are both representable


def _row_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a 2-D tensor: (q int8 (m, k), scale fp32 (m, 1)). Zero rows get scale 1."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # exact in any float dtype: no fp32 copy of x needed
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.div(x, scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)  # the division runs in fp32
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ Wᵀ + b`` with int8 weights (per output channel) and int8 activations (per row, dynamic)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: Any = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.register_buffer("qweight", torch.zeros(in_features, out_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        # Empty, follows module.to(dtype/device): the layer's float dtype when there is no bias to say it.
        self.register_buffer("_dtype_ref", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                                     requires_grad=False) if bias else None)
        self.fallbacks = 0  # forward calls torch._int_mm refused (float matmul of the dequantized weight instead)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype,
                    device=w.device)
        q, scale = _row_quantize(w)  # rows of W = output channels
        layer.qweight.copy_(q.t().contiguous())
        layer.w_scale.copy_(scale.squeeze(1))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    # ---- what code written for nn.Linear reads
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_ref.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, (out, in), in the layer's float dtype: a new tensor on every read, for code that
        inspects ``.weight.dtype`` / ``.device`` / ``.data`` (diffusers' custom-diffusion processors and
        ``fuse_projections`` do; the default attention processors do not). Writing to it changes nothing."""
        return self.dequantized_weight().to(self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 (out, in)."""
        return (self.qweight.t().float() * self.w_scale[:, None])

    def _apply(self, fn, recurse=True):
        # module.to(bfloat16) casts every float buffer; the weight scales stay fp32 (only their device follows).
        scale = self.w_scale
        out = super()._apply(fn, recurse)
        if self.w_scale.dtype != torch.float32:
            self.w_scale = scale.to(device=self.w_scale.device, dtype=torch.float32)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 per-channel weights, dynamic per-row activations")

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        qx, sx = _row_quantize(x2)
        try:
            acc = torch._int_mm(qx, self.qweight)
        except RuntimeError:  # a shape or device this build's int8 GEMM refuses
            self.fallbacks += 1
            y = x2.float() @ self.dequantized_weight().t()
            if self.bias is not None:
                y.add_(self.bias.float())
        else:
            # Memory-bound over the (m, n) output, so as few passes as possible: int32 → fp32, × row scale,
            # then × channel scale + bias in one addcmul (a mixed int32 × fp32 multiply is slower than the cast).
            y = acc.float().mul_(sx)
            if self.bias is not None:
                torch.addcmul(self.bias.float(), y, self.w_scale, out=y)
            else:
                y.mul_(self.w_scale)
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


def _tensor_quantize(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Asymmetric uint8 over the whole tensor: (q uint8, scale, zero point), ``x ≈ (q - zp) · scale``. The range
    always holds 0 (a conv's zero padding must stay exact); a constant tensor gets scale 1."""
    lo, hi = torch.aminmax(x)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zp = int(round(-lo / scale))
    # a 1-element fp32 divisor: the division runs in fp32 also for bf16 input (bf16 holds 0..255 only to ±0.5)
    q = torch.div(x, torch.tensor([scale], dtype=torch.float32)).round_().add_(zp).clamp_(0, 255)
    return q.to(torch.uint8), scale, zp


class Int8Conv2d(nn.Module):
    """A 2-D convolution with int8 weights (symmetric, per output channel) and uint8 activations (asymmetric, per
    tensor, dynamic: measured on every call), by oneDNN's quantized convolution (``torch.ops.onednn``, the kernel
    PyTorch's x86 inductor quantizer lowers to), accumulating in int32 and writing the input's float dtype directly
    (no output scale to calibrate). A whole-tensor activation scale is the price of a convolution: its reduction
    runs over input channels and the kernel window, so a per-row scale would not factor out of the sum; after
    GroupNorm + SiLU the UNet's activations have no wild outliers, and the error is judged (``eval-demo
    --compare``). The weight is packed for oneDNN on the first call and kept (not in the state dict; dropped
    by ``.to()``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        w = conv.weight.detach()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        amax = w.abs().amax(dim=(1, 2, 3)).float()
        scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        self.register_buffer("qweight", torch.div(w, scale[:, None, None, None]).round_().clamp_(-QMAX, QMAX)
                             .to(torch.int8))
        self.register_buffer("w_scale", scale)
        self.register_buffer("_dtype_ref", torch.empty(0, dtype=w.dtype, device=w.device), persistent=False)
        self.register_parameter("bias", nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
                                if conv.bias is not None else None)
        self._packed = None
        self.fallbacks = 0  # calls oneDNN refused: a float convolution of the dequantized weight instead

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_ref.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's float dtype (a new tensor on every read)."""
        return (self.qweight.float() * self.w_scale[:, None, None, None]).to(self.dtype)

    def _apply(self, fn, recurse=True):
        scale = self.w_scale
        out = super()._apply(fn, recurse)
        if self.w_scale.dtype != torch.float32:  # the scales stay fp32 through module.to(bfloat16)
            self.w_scale = scale.to(device=self.w_scale.device, dtype=torch.float32)
        self._packed = None
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"int8 per-channel weights, dynamic per-tensor uint8 activations")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        try:
            if self._packed is None:  # once per layer (again after .to()): the packed weight, zero points, fp32 bias
                self._packed = (torch.ops.onednn.qconv_prepack(self.qweight, self.w_scale, 1.0, 0, *args, None),
                                torch.zeros_like(self.w_scale, dtype=torch.int64),
                                self.bias.float() if self.bias is not None else None)
            packed, w_zps, bias = self._packed
            q, scale, zp = _tensor_quantize(x)
            return torch.ops.onednn.qconv2d_pointwise(q, scale, zp, packed, self.w_scale, w_zps, bias, *args, 1.0, 0,
                                                      x.dtype, "none", [], "")
        except (RuntimeError, AttributeError):  # no oneDNN quantized conv in this build, or a shape it refuses
            self.fallbacks += 1
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return nn.functional.conv2d(x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation,
                                        self.groups)


# ---------------------------------------------------------------- whole modules

def _wanted(include, name: str, linear: nn.Linear) -> bool:
    if include is None:
        return True
    if callable(include):
        return bool(include(name, linear))
    return any(part in name for part in include)


def quantize_linears(module: nn.Module, *, min_features: int = 256,
                     include: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None) -> dict:
    """Replace every ``nn.Linear`` in ``module`` (recursively) whose in_features and out_features are both
    ≥ ``min_features`` with an ``Int8Linear``; smaller ones gain nothing and stay float. ``include`` narrows it
    further: a callable ``(qualified_name, linear) -> bool`` or substrings of the qualified name
    (e.g. ``("attn", "ff.")``). Idempotent: layers already int8 are left as they are.

    Returns (and stores on ``module._sdxl_ui_int8``) the counts over the whole module after the call:
    ``quantized`` (int8 layers now), ``newly_quantized`` (by this call), ``skipped`` (linears left float),
    ``params_int8`` (weights now int8), ``params_total_linear`` (weights of all linear layers), ``min_features``."""
    include = include if include is None or callable(include) else tuple(include)
    new = 0
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # exact type: subclasses (LoRA wrappers …) are not ours to replace
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if min(child.in_features, child.out_features) < min_features or not _wanted(include, name, child):
                continue
            setattr(parent, child_name, Int8Linear.from_linear(child))
            new += 1
    counts = _count(module)
    counts = {"quantized": counts["int8_layers"], "newly_quantized": new, "skipped": counts["float_linears"],
              "params_int8": counts["params_int8"], "params_total_linear": counts["params_total_linear"],
              "min_features": min_features}
    setattr(module, MARKER, {**(getattr(module, MARKER, None) or {}), **counts})
    return counts


def quantize_convs(module: nn.Module, *, min_channels: int = 128) -> dict:
    """Replace every plain ``nn.Conv2d`` in ``module`` with ≥ ``min_channels`` input and output channels, stride 1
    and no groups by an ``Int8Conv2d``; the UNet's first and last convolutions (4 latent channels) stay float, and
    so do the two strided downsamplers (measured slower in int8 on the EPYC: 320 channels at 128², stride 2, 235 vs
    bf16 293 GOP/s). Idempotent. Returns (and adds to ``module._sdxl_ui_int8``) the counts after the call."""
    new = 0
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if (type(child) is not nn.Conv2d or min(child.in_channels, child.out_channels) < min_channels
                    or child.groups != 1 or tuple(child.stride) != (1, 1) or child.padding_mode != "zeros"
                    or isinstance(child.padding, str)):
                continue
            setattr(parent, child_name, Int8Conv2d(child))
            new += 1
    c = _count(module)
    counts = {"conv_quantized": c["int8_convs"], "conv_newly_quantized": new, "conv_skipped": c["float_convs"],
              "conv_params_int8": c["conv_params_int8"], "min_channels": min_channels}
    setattr(module, MARKER, {**(getattr(module, MARKER, None) or {}), **counts})
    return counts


def dequantize_linears(module: nn.Module) -> int:
    """Turn every ``Int8Linear`` back into an ``nn.Linear`` holding the dequantized (rounded) weights; returns how
    many. Not the original model: reload it for that."""
    n = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.qweight.device, dtype=child.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantized_weight())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, child_name, lin)
                n += 1
    if hasattr(module, MARKER):
        delattr(module, MARKER)
    return n


def _count(module: nn.Module) -> dict:
    int8 = floats = p_int8 = p_float = fallbacks = convs = float_convs = p_conv = 0
    for m in module.modules():
        if isinstance(m, Int8Linear):
            int8 += 1
            p_int8 += m.in_features * m.out_features
            fallbacks += m.fallbacks
        elif isinstance(m, nn.Linear):
            floats += 1
            p_float += m.in_features * m.out_features
        elif isinstance(m, Int8Conv2d):
            convs += 1
            p_conv += m.qweight.numel()
            fallbacks += m.fallbacks
        elif isinstance(m, nn.Conv2d):
            float_convs += 1
    return {"int8_layers": int8, "float_linears": floats, "params_int8": p_int8,
            "params_total_linear": p_int8 + p_float, "fallbacks": fallbacks, "int8_convs": convs,
            "float_convs": float_convs, "conv_params_int8": p_conv}


def state(module: nn.Module) -> dict:
    """What is int8 in the live module, found by walking it (not from the marker, so a layer swapped back by
    other code shows): ``{"enabled": False}`` when no layer is int8, else the counts (linear layers and
    convolutions), the share of linear weights that are int8, the forward calls that fell back to float, and
    ``min_features`` / ``min_channels`` from the last ``quantize_linears`` / ``quantize_convs`` calls (None if
    not used)."""
    c = _count(module)
    if not c["int8_layers"] and not c["int8_convs"]:
        return {"enabled": False}
    marker = getattr(module, MARKER, None) or {}
    return {"enabled": True, **c,
            "int8_share": round(c["params_int8"] / c["params_total_linear"], 4) if c["params_total_linear"] else 0.0,
            "min_features": marker.get("min_features"), "min_channels": marker.get("min_channels")}
