"""LoRA adapters on the tiny model (issue 18, part 2): loaded with diffusers' loader, fused, removed exactly; all or
nothing on bad input; with int8 and the feature cache; recorded in the PNG the way AUTOMATIC1111 does."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from tests.helpers import assert_other_picture, assert_same_picture, assert_same_weights, run, weights
from tests.helpers.loras import bad_loras, make_lora, make_text_encoder_lora, to_kohya

from sdxl_ui.adapters import LoraError, file_hash, fused
from sdxl_ui.metadata import parse_parameters, read_parameters
from sdxl_ui.schema import ErrorKind, GenerationRequest, ValidationError
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

FAST = dict(prompt="a red circle", steps=3, seed=5, width=64, height=64, quality="fast",
            techniques={"feature_cache": "off"})


def service(tmp_path, **settings):
    base = dict(model="tiny", device="cpu", precision="fp32", refiner="none", outputs=tmp_path / "out")
    return GenerationService(AppSettings(**{**base, **settings}))


def image(svc, **overrides):
    out = run(svc, GenerationRequest(**{**FAST, **overrides}))
    assert not out["errors"], out["errors"]
    return np.asarray(out["results"][0].image), out["results"][0]


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    from sdxl_ui.models import build_tiny

    folder = tmp_path_factory.mktemp("loras")
    base, _ = build_tiny(with_refiner=False)
    good = make_lora(base.unet, folder / "style", seed=1, scale=0.5)
    other = make_lora(base.unet, folder / "other", seed=2, scale=0.5, name="other.safetensors")
    encoder = make_text_encoder_lora(base, folder / "encoder")
    return {"good": good, "other": other, "encoder": encoder, **bad_loras(folder / "bad", good)}


def test_weight_zero_is_no_lora_and_removing_it_restores_the_base_bit_for_bit(tmp_path, lora_files):
    svc = service(tmp_path)
    plain, _ = image(svc)
    unet_before = weights(svc.models.base.unet)
    svc.set_loras([f"{lora_files['good']}@0"])
    assert_same_weights(unet_before, svc.models.base.unet)  # weight 0: the fused delta is 0, no LoRA layer left
    assert_same_picture(image(svc)[0], plain)  # (within the kernels' rounding: tests/helpers/common.py)
    svc.set_loras([str(lora_files["good"])])
    with_lora, result = image(svc)
    assert_other_picture(with_lora, plain)  # a LoRA changes the output
    row = next(r for r in result.report.rows if r.name == "LoRA adapters")
    assert row.status.value == "active" and "pytorch_lora_weights × 1" in row.detail
    svc.set_loras([])
    assert_same_weights(unet_before, svc.models.base.unet)  # removed: the kept original weights, bit for bit
    assert_same_picture(image(svc)[0], plain)
    svc.set_loras([str(lora_files["good"]), f"{lora_files['other']}@0.5"])  # two, weighted
    two, _ = image(svc)
    assert not np.array_equal(two, with_lora) and not np.array_equal(two, plain)


def test_a_lora_given_at_load_is_fused_and_recorded_in_the_png_as_a1111_does(tmp_path, lora_files):
    svc = service(tmp_path, loras=(f"{lora_files['other']}@0.75",))
    pixels, result = image(svc)
    params = parse_parameters(read_parameters(result.path))
    digest = hashlib.sha256()
    data = lora_files["other"].read_bytes()
    digest.update(data[8 + int.from_bytes(data[:8], "little"):])  # A1111's addnet hash: the file after its header
    assert params["Lora hashes"] == f"other: {digest.hexdigest()[:12]}" == f"other: {file_hash(lora_files['other'])}"
    assert params["Lora weights"] == "other: 0.75"
    assert "other × 0.75" in {r.name: r.detail for r in result.report.rows}["LoRA adapters"]
    assert svc.status()["rows"]  # the status panel lists it (the report's LoRA row)
    assert any("other × 0.75" in r["detail"] for r in svc.status()["rows"] if r["name"] == "LoRA adapters")


@pytest.mark.parametrize("bad", ["missing", "corrupt", "sd15", "rank", "nothing", "nan", "inf", "fp16"])
def test_a_bad_lora_is_refused_by_name_and_the_model_is_unchanged(tmp_path, lora_files, bad):
    svc = service(tmp_path)
    svc.set_loras([str(lora_files["good"])])
    before, _ = image(svc)
    fused_before = weights(svc.models.base.unet)
    path = tmp_path / "missing.safetensors" if bad == "missing" else lora_files[bad]
    with pytest.raises(LoraError) as caught:
        svc.set_loras([str(lora_files["good"]), str(path)])
    message = str(caught.value)
    assert str(path) in message and len(message) < 400, message
    assert svc.settings.loras[0].source == str(lora_files["good"]) and len(svc.settings.loras) == 1
    assert_same_weights(fused_before, svc.models.base.unet)  # nothing half-applied, bit for bit
    assert_same_picture(image(svc)[0], before)


def test_a_bad_lora_at_load_is_bad_input_of_the_run(tmp_path, lora_files):
    svc = service(tmp_path, loras=(str(lora_files["sd15"]),))
    out = run(svc, GenerationRequest(**FAST))
    assert out["errors"] and out["errors"][0].kind is ErrorKind.VALIDATION
    assert "sd15_layout.safetensors" in out["errors"][0].message and "SD 1.5" in out["errors"][0].message


def test_int8_quantizes_the_fused_weights(tmp_path, lora_files):
    plain, _ = image(service(tmp_path / "a", precision="int8"))
    svc = service(tmp_path / "b", precision="int8", loras=(str(lora_files["good"]),))
    with_lora, result = image(svc)
    rows = {r.name: r for r in result.report.rows}
    assert rows["int8 layers"].status.value == "active" and rows["LoRA adapters"].status.value == "active"
    assert not np.array_equal(with_lora, plain)
    svc.set_loras([])  # int8 layers cannot take the weights back in place: the model reloads without the LoRA
    assert_same_picture(image(svc)[0], plain)  # new weight tensors: within the kernels' rounding


def test_the_feature_cache_works_with_a_fused_lora(tmp_path, lora_files):
    svc = service(tmp_path)
    cached = dict(FAST, steps=6, techniques={"feature_cache": "on"})
    plain, _ = image(svc, **cached)
    svc.set_loras([str(lora_files["good"])])
    with_lora, result = image(svc, **cached)
    row = {r.name: r for r in result.report.rows}["feature cache"]
    assert row.status.value == "active" and "cached UNet calls" in row.detail
    assert not np.array_equal(with_lora, plain)


def test_a_lora_on_a_text_encoder_too_is_fused_and_removed_exactly(tmp_path, lora_files):
    from safetensors import safe_open

    with safe_open(str(lora_files["encoder"]), "pt") as f:
        assert any(k.startswith("text_encoder_2.") for k in f.keys())
    svc = service(tmp_path)
    plain, _ = image(svc)
    encoder_before = {k: v.clone() for k, v in svc.models.base.text_encoder_2.state_dict().items()}
    svc.set_loras([str(lora_files["encoder"])])
    assert not np.array_equal(image(svc)[0], plain)
    changed = svc.models.base.text_encoder_2.state_dict()
    assert set(changed) == set(encoder_before)  # plain layers again: the LoRA layers are gone, the delta fused
    assert any(not (changed[k] == encoder_before[k]).all() for k in encoder_before)
    svc.set_loras([])
    assert_same_weights(encoder_before, svc.models.base.text_encoder_2)  # bit for bit
    assert_same_picture(image(svc)[0], plain)  # within the kernels' rounding (tests/helpers/common.py)


def test_a_kohya_layout_lora_is_read_with_its_alphas(tmp_path, lora_files):
    from sdxl_ui.adapters import apply_loras
    from sdxl_ui.models import build_tiny
    from sdxl_ui.settings import parse_lora

    kohya = to_kohya(lora_files["good"], tmp_path / "kohya_style.safetensors", alpha=2.0)  # rank 4: × 0.5
    pipes = [build_tiny(with_refiner=False)[0] for _ in range(2)]
    apply_loras(pipes[0], [parse_lora(str(kohya))])
    apply_loras(pipes[1], [parse_lora(f"{lora_files['good']}@0.5")])
    first, second = (dict(p.unet.named_parameters()) for p in pipes)
    assert all((first[k] == second[k]).all() for k in first)  # the same fused weights, bit for bit


def test_a_lora_whose_fused_weights_overflow_fp16_is_refused_and_the_model_is_unchanged(tmp_path, lora_files):
    """Each factor within fp16's range, their product not: found after fusing, the weights put back."""
    import torch
    from safetensors.torch import load_file
    from tests.helpers.loras import save

    from sdxl_ui.adapters import apply_loras
    from sdxl_ui.models import build_tiny
    from sdxl_ui.settings import LoraSpec

    state = load_file(str(lora_files["good"]))
    big = {k: torch.full_like(v, 300.0) for k, v in state.items()}  # 4 × 300 × 300 = 360,000 > 65,504
    path = save(big, tmp_path / "overflow.safetensors")
    base, _ = build_tiny(with_refiner=False)
    base.to(torch.float16)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    with pytest.raises(LoraError) as caught:
        apply_loras(base, [LoraSpec(str(path), 1.0)])
    assert "overflow.safetensors" in str(caught.value) and "unchanged" in str(caught.value), str(caught.value)
    after = base.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was changed"
    assert not fused(base)


def test_a_prompts_lora_tag_applies_for_that_job_alone_and_is_kept_while_jobs_ask_for_it(tmp_path, lora_files):
    folder = lora_files["good"].parent  # the LoRA folder: its pytorch_lora_weights.safetensors
    svc = service(tmp_path, lora_dir=folder)
    plain, _ = image(svc)
    unet_before = weights(svc.models.base.unet)
    tagged, result = image(svc, prompt="a red circle <lora:pytorch_lora_weights:1>")
    fused_once = weights(svc.models.base.unet)
    alone, _ = image(service(tmp_path / "b", loras=(str(lora_files["good"]),)))
    assert_same_picture(tagged, alone)  # the tag = the same LoRA given at start-up, for this job
    assert_other_picture(tagged, plain)
    params = parse_parameters(result.parameters)
    assert params["Lora hashes"] == f"pytorch_lora_weights: {file_hash(lora_files['good'])}"
    assert result.parameters.startswith("a red circle <lora:pytorch_lora_weights:1>\n")  # the prompt as written
    again, _ = image(svc, prompt="a red circle <lora:pytorch_lora_weights:1>")
    assert_same_weights(fused_once, svc.models.base.unet)  # the same set again: kept fused, nothing redone
    assert_same_picture(again, tagged)
    after, _ = image(svc)  # the next job without a tag: the base again, bit for bit
    assert_same_weights(unet_before, svc.models.base.unet)
    assert_same_picture(after, plain)
    half, _ = image(svc, prompt="<lora:pytorch_lora_weights:0.5> a red circle")
    assert_other_picture(half, tagged)
    assert_other_picture(half, plain)


@pytest.mark.parametrize("prompt", ["x <lora:missing:1>", "x <lora:../style/x:1>", "x <lora:/etc/passwd:1>",
                                    "x <lora:" + "a" * 300 + ":1>"])
def test_a_lora_tag_outside_the_folder_is_refused_by_name_and_the_model_is_unchanged(tmp_path, lora_files, prompt):
    svc = service(tmp_path, lora_dir=lora_files["good"].parent)
    image(svc)
    unet_before = weights(svc.models.base.unet)
    out = run(svc, GenerationRequest(**{**FAST, "prompt": prompt}))
    assert len(out["errors"]) == 1 and out["errors"][0].kind is ErrorKind.VALIDATION
    message = out["errors"][0].message
    assert message.startswith("prompt: no LoRA of that name in the LoRA folder style/") and "<lora:" in message
    assert str(lora_files["good"].parent) not in message  # the folder by its name only
    assert_same_weights(unet_before, svc.models.base.unet)


@pytest.mark.parametrize("prompt, problem", [("x <lora:style:heavy>", "must be a number"),
                                             ("x <lora::1>", "names no LoRA"), ("x <lora:a:11>", "from -10 to 10")])
def test_a_bad_lora_tag_is_bad_input_of_the_request(prompt, problem):
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(prompt=prompt)
    assert caught.value.field == "prompt" and problem in str(caught.value)
