"""The run-hook registry (``optimizations/hooks.py``): one registry per pipeline holding the hooks and the
techniques' state, and the points a run calls — each installed hook that has the point's method gets its say."""
from __future__ import annotations

from types import SimpleNamespace

from sdxl_ui.optimizations import hooks


class Pipe:
    """A stand-in pipeline: records its call's arguments and returns them as its "images"."""

    def __call__(self, **kwargs):
        return SimpleNamespace(images=kwargs)


class Recorder:
    def __init__(self, name, calls, decoded=None):
        self.name, self.calls, self.decoded = name, calls, decoded

    def before(self, pipe):
        self.calls.append((self.name, "before"))

    def begin(self, pipe):
        self.calls.append((self.name, "begin"))

    def wrap(self, pipe, step_callback):
        self.calls.append((self.name, "wrap"))
        return (lambda *a: (self.name, step_callback)), None

    def decode(self, pipe, latents):
        return self.decoded

    def release(self, pipe):
        self.calls.append((self.name, "release"))


def test_install_replace_and_remove_by_name_in_the_order_installed():
    pipe = Pipe()
    first, second = object(), object()
    hooks.install(pipe, "a", first)
    hooks.install(pipe, "b", second)
    assert list(hooks.installed(pipe)) == ["a", "b"] and hooks.get(pipe, "b") is second
    hooks.install(pipe, "a", second)  # replaced in place, keeps its order
    assert hooks.installed(pipe) == {"a": second, "b": second}
    hooks.install(pipe, "a", None)
    assert hooks.installed(pipe) == {"b": second} and hooks.get(pipe, "a") is None
    assert hooks.installed(Pipe()) == {} and hooks.get(Pipe(), "a") is None  # a pipe with none: nothing created


def test_state_lives_in_the_one_registry_attribute():
    pipe = Pipe()
    assert hooks.state(pipe, "loras", ()) == ()
    hooks.set_state(pipe, "loras", ("x",))
    hooks.install(pipe, "h", object())
    assert hooks.state(pipe, "loras") == ("x",)
    assert [k for k in vars(pipe)] == [hooks.ATTR]  # hooks and state: one attribute on the pipeline
    hooks.set_state(pipe, "loras", None)
    assert hooks.state(pipe, "loras", "gone") == "gone"


def test_a_call_runs_before_begin_and_wrap_of_every_hook_in_order():
    pipe, calls = Pipe(), []
    hooks.install(pipe, "a", Recorder("a", calls))
    hooks.install(pipe, "b", Recorder("b", calls))
    hooks.install(pipe, "plain", object())  # a hook without any of the points: skipped, never an error
    out = hooks.call(pipe, "callback", num_inference_steps=3)
    assert calls == [("a", "before"), ("b", "before"), ("a", "begin"), ("b", "begin"), ("a", "wrap"), ("b", "wrap")]
    assert out["num_inference_steps"] == 3
    name, inner = out["callback_on_step_end"]()  # b wrapped a's wrapper around the given callback
    assert name == "b" and inner() == ("a", "callback")
    hooks.release(pipe)
    assert calls[-2:] == [("a", "release"), ("b", "release")]


def test_the_first_hook_that_decodes_wins_and_none_means_the_vae():
    pipe, calls = Pipe(), []
    assert hooks.decode(pipe, "latents") is None and hooks.preview(pipe, "latents") is None
    assert hooks.decoder_name(pipe) is None and hooks.modules(pipe) == []
    hooks.install(pipe, "declines", Recorder("declines", calls, decoded=None))
    hooks.install(pipe, "decodes", Recorder("decodes", calls, decoded="image"))
    assert hooks.decode(pipe, "latents") == "image"


def test_the_tiny_decoder_is_a_hook_for_decode_name_preview_and_modules():
    import torch
    from diffusers import AutoencoderTiny

    from sdxl_ui.optimizations import tiny_decoder

    decoder = AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                              num_encoder_blocks=(1,), num_decoder_blocks=(1,)).eval()
    pipe, latents = Pipe(), torch.zeros(1, 4, 8, 8)
    tiny_decoder.attach(pipe, tiny_decoder.Attached(decoder, "some/taesd", final=False))
    assert hooks.decode(pipe, latents) is None and hooks.decoder_name(pipe) is None  # previews only
    assert hooks.preview(pipe, latents) is not None and hooks.modules(pipe) == [decoder]
    tiny_decoder.attach(pipe, tiny_decoder.Attached(decoder, "some/taesd", final=True))
    assert hooks.decoder_name(pipe) == "tiny decoder some/taesd"
    assert torch.equal(hooks.decode(pipe, latents), tiny_decoder.decode(decoder, latents))
    tiny_decoder.attach(pipe, None)
    assert tiny_decoder.attached(pipe) is None and hooks.decode(pipe, latents) is None
