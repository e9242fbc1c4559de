"""The PNG ``parameters`` chunk names the profile and each LoRA's name, weight and hash as AUTOMATIC1111 writes
its ``Lora hashes`` field (issue 18)."""
from sdxl_ui.metadata import ImageParameters, parse_parameters

BASE = dict(prompt="a cat", negative_prompt="", steps=4, sampler="Euler", cfg_scale=0.0, seed=1, width=64, height=64,
            model="tiny", device="cpu", dtype="float32")


def test_lora_hashes_and_weights_and_profile_fields():
    params = ImageParameters(**BASE, profile="lightning-4",
                             loras=(("style", 0.8, "0123456789ab"), ("a,b:c", 1.0, "ba9876543210")))
    text = params.to_text()
    assert 'Lora hashes: "style: 0123456789ab, a_b_c: ba9876543210"' in text
    parsed = parse_parameters(text)
    assert parsed["Profile"] == "lightning-4"
    assert parsed["Lora hashes"] == "style: 0123456789ab, a_b_c: ba9876543210"
    assert parsed["Lora weights"] == "style: 0.8, a_b_c: 1"


def test_without_loras_or_profile_the_chunk_is_as_before():
    text = ImageParameters(**BASE).to_text()
    assert "Lora" not in text and "Profile" not in text
