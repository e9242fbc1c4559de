from PIL import Image

from sdxl_ui.metadata import ImageParameters, parse_parameters, read_parameters, save_png


def test_parameters_chunk_round_trip_with_html_emoji_and_commas(tmp_path):
    params = ImageParameters(
        prompt="<script>alert('x')</script> 🦊 狐狸, in snow", negative_prompt="blurry, <b>bold</b>", steps=35,
        sampler="Euler", cfg_scale=8.0, seed=7, width=256, height=256, model="tiny", device="cpu",
        dtype="bfloat16", note="tiny test model — random weights, output is noise")
    path = tmp_path / "x.png"
    save_png(Image.new("RGB", (8, 8)), path, params, {"seed": 7})
    text = read_parameters(path)
    assert text == params.to_text()
    parsed = parse_parameters(text)
    assert parsed["prompt"] == params.prompt
    assert parsed["negative_prompt"] == params.negative_prompt
    assert parsed["Seed"] == "7" and parsed["Steps"] == "35" and parsed["Size"] == "256x256"
    assert parsed["Note"] == "tiny test model — random weights, output is noise"
    assert parsed["Model"] == "tiny" and parsed["Dtype"] == "bfloat16"
