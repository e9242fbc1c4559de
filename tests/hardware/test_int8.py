"""Int8 linear layers and convolutions (sdxl_ui.optimizations.int8): correctness only, never speed, so they pass on any CPU.

Error bounds: rounding to a step Δ = max/127 adds noise of RMS Δ/√12 per operand. For Gaussian rows of k values
max ≈ σ·√(2 ln k), so each operand carries ≈ 0.55 % (k = 64) to 0.9 % (k = 1280) relative RMS noise and the
product ≈ 0.8–1.3 %; the single-layer bound is 2 %. Through the tiny UNet's ~30 quantized layers the errors
compound but stay small relative to the signal: bound 5 % (measured ≈ 0.9 % in fp32; ≈ 1.8 % in bf16, where the
bf16 reference carries its own rounding).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sdxl_ui.optimizations.int8 import (Int8Conv2d, Int8Linear, dequantize_linears, quantize_convs, quantize_linears,
                                         state)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def gaussian_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)  # Gaussian: the harder case (uniform is easier)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin


# ---------------------------------------------------------------- one layer

def test_weights_are_int8_per_channel_and_transposed():
    lin = gaussian_linear(96, 40)
    q = Int8Linear.from_linear(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (96, 40) and q.qweight.is_contiguous()
    assert q.w_scale.dtype == torch.float32 and q.w_scale.shape == (40,)
    # Per output channel: each channel's largest weight maps to ±127.
    assert torch.equal(q.qweight.abs().amax(dim=0), torch.full((40,), 127, dtype=torch.int8))
    assert torch.allclose(q.dequantized_weight(), lin.weight, atol=float(q.w_scale.max()) / 2 + 1e-7)
    assert (q.in_features, q.out_features) == (96, 40)
    assert not any(p.dtype == torch.float32 and p.numel() == 96 * 40 for p in q.parameters())  # no float copy kept
    assert q.weight.shape == lin.weight.shape and q.weight.dtype == torch.float32


@pytest.mark.parametrize("rows", [1, 77, 4096])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float_linear_2d(rows, bias):
    lin = gaussian_linear(320, 200, bias=bias)  # k, n not multiples of 8 handled too (see the odd-shape test)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_rms(out, ref) < 0.02
    assert not torch.equal(out, ref)  # it really went through int8
    assert q.fallbacks == 0  # torch._int_mm took these shapes on this CPU


def test_odd_shapes_3d_input():
    lin = gaussian_linear(77, 33)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 77, 77, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, out = lin(x), q(x)
    assert out.shape == (2, 77, 33)
    assert rel_rms(out, ref) < 0.02


def test_bf16_input_returns_bf16():
    lin = gaussian_linear(256, 128).to(torch.bfloat16)
    q = Int8Linear.from_linear(lin)
    assert q.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16 and q.w_scale.dtype == torch.float32
    assert q.weight.dtype == torch.bfloat16  # what code reading attn.to_q.weight.dtype sees
    x = torch.randn(3, 50, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.inference_mode():
        out = q(x)
        ref = x.float() @ lin.weight.float().t() + lin.bias.float()
    assert out.dtype == torch.bfloat16 and out.shape == (3, 50, 128)
    assert rel_rms(out, ref) < 0.02


def test_zero_row_gives_bias_not_nan():
    lin = gaussian_linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(4, 64)
    x[2] = 0
    with torch.inference_mode():
        out = q(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[2], lin.bias.detach())


def test_zero_weight_channel():
    lin = gaussian_linear(64, 48)
    with torch.no_grad():
        lin.weight[5] = 0
    q = Int8Linear.from_linear(lin)
    assert torch.isfinite(q.w_scale).all() and (q.w_scale > 0).all()
    with torch.inference_mode():
        out = q(torch.randn(8, 64))
    assert torch.allclose(out[:, 5], lin.bias.detach()[5].expand(8))


def test_module_to_keeps_scales_fp32():
    q = Int8Linear.from_linear(gaussian_linear(64, 32))
    q.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert q.w_scale.dtype == torch.float32 and q.qweight.dtype == torch.int8
    assert q(torch.randn(5, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_refused_int_mm_falls_back_and_counts(monkeypatch):
    lin = gaussian_linear(64, 32)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(7, 64)

    def refuse(a, b):
        raise RuntimeError("_int_mm: self.size(0) needs to be greater than 16")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    with torch.inference_mode():
        out = q(x)
    assert q.fallbacks == 1
    assert rel_rms(out, lin(x).detach()) < 0.02
    assert state(nn.Sequential(q))["fallbacks"] == 1


# ---------------------------------------------------------------- a whole UNet

def tiny_unet():
    """The project's tiny SDXL-layout UNet (see sdxl_ui.models), built here so the test needs no tokenizer."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=96, use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    ).eval()


def unet_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=g).to(dtype), timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, 96, generator=g).to(dtype),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g).to(dtype),
                           "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2).to(dtype)},
    )


def count_linears(module):
    return (sum(isinstance(m, Int8Linear) for m in module.modules()),
            sum(type(m) is nn.Linear for m in module.modules()))


def test_quantize_unet_counts_output_idempotent_and_state():
    unet = tiny_unet()
    _, linears = count_linears(unet)
    small = sum(type(m) is nn.Linear and min(m.in_features, m.out_features) < 64 for m in unet.modules())
    assert small > 0  # some stay float: the 32-wide ones (time embedding input, the 32-channel resnets' projections)
    total_params = sum(m.in_features * m.out_features for m in unet.modules() if type(m) is nn.Linear)
    assert state(unet) == {"enabled": False}
    with torch.inference_mode():
        ref = unet(**unet_inputs()).sample

    counts = quantize_linears(unet, min_features=64)
    assert counts["quantized"] == counts["newly_quantized"] == linears - small > 20
    assert counts["skipped"] == small
    assert counts["params_total_linear"] == total_params
    assert 0 < counts["params_int8"] <= total_params
    assert count_linears(unet) == (linears - small, small)
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.to_q, Int8Linear) and attn.to_q.qweight.dtype == torch.int8
    assert attn.to_q.weight.dtype == torch.float32  # diffusers code reading .weight.dtype still works

    with torch.inference_mode():
        out = unet(**unet_inputs()).sample
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < rel_rms(out, ref) < 0.05

    again = quantize_linears(unet, min_features=64)  # idempotent
    assert again["newly_quantized"] == 0
    assert {k: v for k, v in again.items() if k != "newly_quantized"} == \
        {k: v for k, v in counts.items() if k != "newly_quantized"}
    with torch.inference_mode():
        assert torch.equal(unet(**unet_inputs()).sample, out)

    st = state(unet)
    assert st["enabled"] is True and st["int8_layers"] == counts["quantized"] and st["float_linears"] == small
    assert st["params_int8"] == counts["params_int8"] and st["min_features"] == 64 and st["fallbacks"] == 0

    # A layer swapped back behind the plan's back shows in the live state, not the stored counts.
    lin = nn.Linear(attn.to_q.in_features, attn.to_q.out_features, bias=False)
    attn.to_q = lin
    st2 = state(unet)
    assert st2["int8_layers"] == st["int8_layers"] - 1 and st2["float_linears"] == small + 1

    assert dequantize_linears(unet) == st["int8_layers"] - 1
    assert state(unet) == {"enabled": False}


def test_min_features_and_include_filter():
    unet = tiny_unet()
    _, linears = count_linears(unet)
    assert quantize_linears(unet, min_features=10_000)["quantized"] == 0
    assert state(unet) == {"enabled": False}
    blocks = sum(n.endswith("attn1.to_q") for n, _ in unet.named_modules())  # one per transformer block
    counts = quantize_linears(unet, min_features=32, include=("attn1.to_q",))
    assert counts["quantized"] == blocks > 0 and counts["skipped"] == linears - blocks
    names = [n for n, m in unet.named_modules() if isinstance(m, Int8Linear)]
    assert len(names) == blocks and all(n.endswith("attn1.to_q") for n in names)
    counts = quantize_linears(unet, min_features=32, include=lambda name, lin: "ff.net" in name)
    assert counts["newly_quantized"] == 2 * blocks  # GEGLU proj + output linear per block
    assert counts["quantized"] == 3 * blocks


def test_quantized_bf16_unet_runs_in_bf16():
    unet = tiny_unet().to(torch.bfloat16)
    with torch.inference_mode():
        ref = unet(**unet_inputs(torch.bfloat16)).sample
    quantize_linears(unet, min_features=32)
    with torch.inference_mode():
        out = unet(**unet_inputs(torch.bfloat16)).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_rms(out, ref) < 0.05


# ---------------------------------------------------------------- convolutions
# One convolution: Gaussian input and weights. The weight's per-channel step adds ≈ 0.9 % relative RMS (k = 9·C
# values per channel); the input's whole-tensor asymmetric uint8 step (range/255 over a Gaussian tensor of ~10⁵
# values, range ≈ 9 σ) adds ≈ 1 %: ≈ 1.2 % for the product (measured 1.1-1.3 %); bound 3 %.

def gaussian_conv(c_in: int, c_out: int, bias: bool = True, stride: int = 1, seed: int = 0) -> nn.Conv2d:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (9 * c_in) ** 0.5)
        if bias:
            conv.bias.copy_(torch.randn(c_out, generator=g) * 0.1)
    return conv


ONEDNN = torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_conv_matches_the_float_conv_in_its_dtype(dtype, bias):
    conv = gaussian_conv(64, 96, bias=bias)
    x = torch.randn(2, 64, 24, 20, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = conv(x)
        q = Int8Conv2d(conv).to(dtype)
        out = q(x.to(dtype))
    assert q.qweight.dtype == torch.int8 and q.w_scale.dtype == torch.float32  # scales stay fp32 through .to()
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < rel_rms(out, ref) < 0.03
    assert q.fallbacks == (0 if ONEDNN else 1)
    assert q.weight.shape == conv.weight.shape and rel_rms(q.weight, conv.weight) < 0.02


def test_int8_conv_of_zeros_is_its_bias_and_padding_stays_zero():
    conv = gaussian_conv(32, 32)
    q = Int8Conv2d(conv)
    with torch.inference_mode():
        out = q(torch.zeros(1, 32, 8, 8))
        # a positive-only input: the range still holds 0, so the zero padding is exact (edges match the float conv)
        x = torch.rand(1, 32, 8, 8, generator=torch.Generator().manual_seed(2)) + 1.0
        ref, got = conv(x), q(x)
    assert torch.allclose(out, conv.bias.view(1, -1, 1, 1).expand_as(out), atol=1e-6)
    assert rel_rms(got[..., 0, :], ref[..., 0, :]) < 0.03 and rel_rms(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1]) < 0.03


def test_a_refused_int8_conv_falls_back_to_float_and_counts(monkeypatch):
    from sdxl_ui.optimizations import int8

    conv = gaussian_conv(32, 32)
    q = Int8Conv2d(conv)

    def refuse(x):
        raise RuntimeError("quantized::packed_weights_conv2d: refused")

    monkeypatch.setattr(int8, "_tensor_quantize", refuse)
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = q(x)
    assert q.fallbacks == 1 and rel_rms(out, conv(x)) < 0.02  # the dequantized weight: only its own rounding


def test_quantize_convs_skips_the_narrow_and_strided_ones_and_state_counts_them():
    unet = tiny_unet()
    convs = [m for m in unet.modules() if type(m) is nn.Conv2d]
    wanted = [m for m in convs if min(m.in_channels, m.out_channels) >= 32 and m.stride == (1, 1)]
    assert 0 < len(wanted) < len(convs)  # conv_in / conv_out (4 channels) and the downsamplers stay float
    with torch.inference_mode():
        ref = unet(**unet_inputs()).sample
    counts = quantize_convs(unet, min_channels=32)
    assert counts["conv_quantized"] == counts["conv_newly_quantized"] == len(wanted)
    assert counts["conv_skipped"] == len(convs) - len(wanted)
    assert isinstance(unet.conv_in, nn.Conv2d) and not isinstance(unet.conv_in, Int8Conv2d)
    assert quantize_convs(unet, min_channels=32)["conv_newly_quantized"] == 0  # idempotent
    st = state(unet)
    assert st["enabled"] is True and st["int8_convs"] == len(wanted) and st["int8_layers"] == 0
    assert st["min_channels"] == 32 and st["conv_params_int8"] == sum(m.weight.numel() for m in wanted)
    with torch.inference_mode():
        out = unet(**unet_inputs()).sample
    assert out.shape == ref.shape and 0 < rel_rms(out, ref) < 0.05
    quantize_linears(unet, min_features=64)  # both kinds: the counts of both stay on the module
    st = state(unet)
    assert st["int8_layers"] > 0 and st["int8_convs"] == len(wanted) and st["fallbacks"] == 0
