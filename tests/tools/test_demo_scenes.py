"""The scene world and its reader (sdxl_ui/demo/scenes.py), checked on drawn reference scenes: the reader is
the judge of every demo-model test, so it is tested first, without any model."""
from __future__ import annotations

import numpy as np
import pytest

from sdxl_ui.demo import scenes as S


def test_generator_is_deterministic_from_its_seed():
    a = [S.render(S.sample_scene(r := np.random.default_rng(5)), r)[0] for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    other = S.render(S.sample_scene(r := np.random.default_rng(6)), r)[0]
    assert not np.array_equal(a[0], other)


def test_scene_world_rules():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = S.sample_scene(rng)
        assert scene.color != scene.background
        assert (scene.color, scene.shape) not in S.HELD_OUT
    assert all(S.sample_scene(rng, held_out=True).held_out for _ in range(50))
    with pytest.raises(ValueError, match="background"):
        S.Scene("red", "red", "circle", "center", "small")
    with pytest.raises(ValueError, match="shape: 'star'"):
        S.Scene("red", "blue", "star", "center", "small")


def test_drawn_geometry_matches_the_spec():
    scene = S.Scene("red", "blue", "square", "left", "large")
    image, mask = S.render(scene, jitter=False)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (0, 64, 32, 96)  # d = 64 centred at (32, 64)
    assert tuple(image[64, 32]) == S.COLORS["red"] and tuple(image[5, 120]) == S.COLORS["blue"]
    tri, tri_mask = S.render(S.Scene("red", "blue", "triangle", "center", "large"), jitter=False)
    rows = tri_mask.sum(axis=1)
    assert rows[33] < 4 and rows[94] > 60  # apex at the top centre, base along the bottom edge
    disc = S.render(S.Scene("red", "blue", "circle", "center", "small"), jitter=False)[1]
    assert abs(disc.sum() - np.pi * 16 ** 2) < 30


def test_training_captions_never_name_a_held_out_pair():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        text = S.caption(S.sample_scene(rng), rng)
        for color, shape in S.HELD_OUT:
            assert f"{color} {shape}" not in text
        assert "  " not in text and not text.endswith((",", " "))


def test_reader_reads_every_attribute_of_drawn_scenes():
    rng = np.random.default_rng(2)
    wrong = []
    for _ in range(400):
        scene = S.sample_scene(rng, held_out=None)
        reading = S.read_scene(S.render(scene, rng)[0])
        if not all(reading.matches(scene).values()):
            wrong.append((scene, reading))
    assert wrong == []


def test_reader_is_not_fooled_by_noise_or_a_blank_picture():
    blank = np.full((128, 128, 3), S.COLORS["green"], dtype=np.uint8)
    reading = S.read_scene(blank)
    assert reading.background == "green" and reading.shape is None and reading.color is None
    noise = np.random.default_rng(3).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    scenes = [S.Scene(c, b, "circle", "center", "large") for c, b in (("red", "blue"), ("white", "black"))]
    noisy = S.read_scene(noise)
    assert not all(all(noisy.matches(s).values()) for s in scenes)


def test_reader_on_a_softened_picture():
    """Generated pictures have soft edges and a little noise; the reader must still read them."""
    rng = np.random.default_rng(4)
    ok = 0
    for _ in range(60):
        scene = S.sample_scene(rng)
        image = S.render(scene, rng)[0].astype(float)
        blurred = (image + np.roll(image, 1, 0) + np.roll(image, -1, 0) + np.roll(image, 1, 1)
                   + np.roll(image, -1, 1)) / 5 + rng.normal(0, 6, image.shape)
        ok += all(S.read_scene(np.clip(blurred, 0, 255).astype(np.uint8)).matches(scene).values())
    assert ok >= 57


def test_prompt_for_names_what_is_asked():
    scene = S.Scene("yellow", "black", "triangle", "top", "small")
    assert S.prompt_for(scene) == "a small yellow triangle at the top on a black background"
    assert S.prompt_for(scene, ("color",)) == "a yellow shape"


def test_eval_prompt_sets_are_fixed_and_balanced():
    scenes = S.eval_scenes(48, seed=1234)
    assert scenes == S.eval_scenes(48, seed=1234)
    assert not any(s.held_out for s in scenes)
    assert len({(s.color, s.shape) for s in scenes}) == 21  # every trained colour/shape pair
    assert all(s.held_out for s in S.eval_scenes(6, seed=77, held_out=True))


def test_tokenizer_has_one_token_per_scene_word_and_still_reads_other_words():
    from sdxl_ui.demo.architecture import build_tokenizer

    tokenizer = build_tokenizer()
    assert all(len(tokenizer.tokenize(w)) == 1 for w in S.WORDS)
    assert tokenizer.tokenize("a red fox") == ["a</w>", "red</w>", "f", "o", "x</w>"]
    assert len(tokenizer("a red circle").input_ids) == 5  # start, 3 words, end
