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


def test_the_fields_line_parses_as_automatic1111s_regex_does():
    """The one-scan parser finds what A1111's regex (re.findall) finds, on typical lines and on random ones."""
    import random
    import re

    from sdxl_ui.metadata import _fields

    a1111 = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
    lines = ['Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abc',
             'Lora hashes: "ink: 0123456789ab, paper: ba9876543210", Note: "a \\"quoted\\" word", Seed: 3',
             ' Steps :20,,, :x, a-b/c d: e, "x": y, Note: "open', '', ':', 'a:', 'é ü: ö, 狐: 狸']
    rng = random.Random(7)
    lines += ["".join(rng.choice('ab :,"\\-/_é\t') for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for line in lines:
        assert _fields(line) == a1111.findall(line), repr(line)


def test_a_long_fields_line_without_a_colon_parses_in_linear_time():
    import time

    text = "a fox\nNegative prompt: blur\nSteps: 20, Sampler: Euler, " + "word " * 20_000
    start = time.perf_counter()
    parsed = parse_parameters(text)
    assert time.perf_counter() - start < 0.5 and parsed["Steps"] == "20"


def test_an_invalid_json_escape_or_an_open_quote_keeps_the_text():
    parsed = parse_parameters('p\nSteps: 2, Note: "bad \\q", Other: "open, Seed: 4')
    assert parsed["Note"] == '"bad \\q"' and parsed["Other"] == '"open' and parsed["Seed"] == "4"
