"""`app.py --api --model demo` driven by the real AUTOMATIC1111 client (webuiapi) and by raw HTTP: pictures the
scene reader judges right, info whose seeds reproduce the image, progress with a preview, interrupt of the
caller's own job only, the model/sampler/option lists, HTTP Basic, and every bad input refused by name."""
from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time

import numpy as np
import pytest
from tests.helpers import launched
from tests.helpers.a1111 import Server, http

webuiapi = pytest.importorskip("webuiapi")

ALICE, BOB = ("alice", "pw-alice"), ("bob", "pw-bob")  # alice: the first --api-auth login, so the operator
FAST = dict(steps=20, cfg_scale=8.0, width=128, height=128, sampler_name="Euler")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("a1111-out"), "--api", "--model", "demo", "--api-auth",
                  "alice:pw-alice,bob:pw-bob", "--api-models", "tiny", app=Server) as running:
        yield running


def client(server, login=ALICE):
    return webuiapi.WebUIApi(port=server.port, username=login[0], password=login[1])


def test_txt2img_pictures_are_judged_right_for_several_prompts(server):
    from sdxl_ui.demo import evaluate as E
    from sdxl_ui.demo import scenes as S

    api = client(server)
    right, total = 0, 0
    for i, scene in enumerate(E.prompt_set()[:4]):
        prompt = S.prompt_for(scene)
        result = api.txt2img(prompt=prompt, seed=E.SEED0 + i, steps=50, cfg_scale=8.0, width=128, height=128,
                             sampler_name="Euler")
        assert len(result.images) == 1 and result.image.size == (128, 128)
        assert result.info["prompt"] == prompt and result.info["all_seeds"] == [E.SEED0 + i]
        assert f"Seed: {E.SEED0 + i}" in result.image.info["parameters"]  # the PNG's parameters chunk
        judged = S.read_scene(result.image.convert("RGB")).matches(scene, ("color", "background", "shape",
                                                                             "position"))
        right, total = right + sum(judged.values()), total + len(judged)
    assert right >= total - 2, (right, total)


def test_info_parses_and_its_seed_reproduces_the_image(server):
    api = client(server)
    first = api.txt2img(prompt="a small green square at the left on a white background", seed=-1, **FAST)
    info = first.info
    assert isinstance(info, dict) and info["seed"] == info["all_seeds"][0] >= 0
    assert info["sampler_name"] == "Euler" and info["steps"] == 20 and info["width"] == 128
    assert len(info["infotexts"]) == 1 and f"Seed: {info['seed']}" in info["infotexts"][0]
    assert first.parameters["seed"] == -1 and first.parameters["prompt"].startswith("a small green")
    again = api.txt2img(prompt=info["prompt"], seed=info["seed"], **FAST)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))


def test_batch_and_iterations_carry_consecutive_seeds(server):
    result = client(server).txt2img(prompt="a red circle", seed=40, batch_size=2, n_iter=2, **{**FAST, "steps": 5})
    assert len(result.images) == 4 and result.info["all_seeds"] == [40, 41, 42, 43]
    assert [f"Seed: {s}" in t for s, t in zip(result.info["all_seeds"], result.info["infotexts"])] == [True] * 4


def run_in_thread(fn, **kwargs):
    out = {}

    def target():
        try:
            out["result"] = fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_progress_rises_with_a_preview_and_interrupt_stops_only_the_callers_job(server):
    alice, bob = client(server, ALICE), client(server, BOB)
    long_job, long_out = run_in_thread(alice.txt2img, prompt="a large blue square on a yellow background", seed=3,
                                       steps=150, cfg_scale=8.0, width=128, height=128, sampler_name="Euler")
    seen, previews, end = [], [], time.time() + 120
    while time.time() < end and (len(seen) < 3 or not previews or seen[-1] < 0.25):
        state = alice.get_progress()
        if state["state"]["sampling_steps"]:
            seen.append(state["progress"])
            assert state["state"]["job_count"] == 1 and state["textinfo"]
        if state["current_image"]:
            previews.append(state["current_image"])
        time.sleep(0.1)
    assert seen == sorted(seen) and seen[-1] > seen[0], seen
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(previews[-1]))).size[0] > 0
    assert bob.get_progress()["progress"] == 0 and bob.get_progress()["current_image"] is None  # not alice's
    bob.interrupt()  # bob has no job: alice's goes on
    time.sleep(0.5)
    assert long_job.is_alive() and alice.get_progress()["progress"] > seen[-1]
    bob_job, bob_out = run_in_thread(bob.txt2img, prompt="a small red circle", seed=9, **FAST)
    time.sleep(0.3)
    assert "Waiting" in bob.get_progress()["textinfo"]  # in line behind alice
    step_before = alice.get_progress()["state"]["sampling_step"]
    asked = time.monotonic()
    alice.interrupt()
    long_job.join(30)
    assert "error" not in long_out and long_out["at"] - asked < 3.0, long_out
    assert long_out["result"].images == []  # interrupted before its image
    stopped = [int(m) for m in re.findall(r"cancelled at step (\d+)/", server.output)]
    assert stopped and step_before <= stopped[-1] <= step_before + 3, (step_before, stopped)  # within a step or so
    bob_job.join(60)
    assert "error" not in bob_out and len(bob_out["result"].images) == 1  # the other user's job finishes


def test_models_samplers_schedulers_options_and_memory(server):
    api = client(server)
    assert api.util_get_model_names() == ["demo", "tiny"] and api.util_get_current_model() == "demo"  # --api-models
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(api.util_get_sampler_names())
    assert "karras" in api.util_get_scheduler_names()
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "demo" and options["sdxl_ui_quality_presets"]["fast"]["steps"] == 20
    assert api.get_loras() == [] and api.get_memory()["ram"]["total"] > 0
    assert api.set_options({"sd_model_checkpoint": "demo"}) is None  # no change
    status, _, body = http(server.api + "options", {"sd_model_checkpoint": "tiny"}, login=BOB)
    assert status == 403 and "operator" in body["detail"]  # bob is not the operator
    assert http(server.api + "options", {"sd_model_checkpoint": "nope"}, login=ALICE)[0] == 422
    assert api.get_options()["sd_model_checkpoint"] == "demo"


def test_the_preset_is_reachable_with_the_extension_field(server):
    status, _, body = http(server.api + "txt2img", {"prompt": "a red circle", "seed": 1, "width": 128,
                                                    "height": 128, "steps": 3, "sdxl_ui": {"quality": "fast"}},
                           login=ALICE)
    assert status == 200
    info = json.loads(body["info"])
    # the preset's 20 steps × 0.7: the CPU steps policy applies where the client named no steps of its own
    assert (info["steps"], info["cfg_scale"], info["sampler_name"], info["scheduler"]) == (14, 6.0, "DPM++ 2M",
                                                                                           "Karras")


def test_without_credentials_401_and_with_them_200(server):
    status, headers, body = http(server.api + "sd-models")
    assert status == 401 and headers.get("www-authenticate", "").startswith("Basic")
    assert http(server.api + "txt2img", {"prompt": "x"})[0] == 401
    assert http(server.api + "img2img", {})[0] == 401  # auth before anything else
    assert http(server.api + "sd-models", login=("alice", "wrong"))[0] == 401
    assert http(server.api + "sd-models", login=ALICE)[0] == 200
    assert "login failed for user 'alice'" in server.output


BAD = [
    ({"prompt": "x", "steps": 0}, "steps", "0"),
    ({"prompt": "x", "steps": 10**9}, "steps", "1000000000"),
    ({"prompt": "x", "width": 60}, "width", "60"),  # below 64 (a size above it is rounded down to 8, as A1111)
    ({"prompt": "x", "width": 4096}, "width", "4096"),
    ({"prompt": "x", "batch_size": -1}, "batch_size", "-1"),
    ({"prompt": "x", "sampler_name": "Nope"}, "sampler_name", "Nope"),  # every A1111 sampler is known (samplers.py)
    ({"prompt": "x", "sampler_name": "Euler", "scheduler": "Nope"}, "scheduler", "Nope"),
]


@pytest.mark.parametrize("body, field, value", BAD)
def test_bad_input_gets_422_naming_the_field_and_the_value(server, body, field, value):
    status, _, reply = http(server.api + "txt2img", {**body, "eta": 0, "s_churn": 0}, login=ALICE)
    assert status == 422, reply
    detail = reply["detail"][0]
    assert detail["loc"] == ["body", field] and value in detail["msg"], detail


def test_bad_bytes_text_and_base64_get_422(server):
    status, _, reply = http(server.api + "txt2img", b'{"prompt": "caf\xe9"}', login=ALICE)
    assert status == 422 and "UTF-8" in reply["detail"][0]["msg"]
    status, _, reply = http(server.api + "txt2img", b'{"prompt": "\\ud800 x"}', login=ALICE)
    assert status == 422 and reply["detail"][0]["loc"] == ["body", "prompt"] and "Unicode" in reply["detail"][0]["msg"]
    status, _, reply = http(server.api + "txt2img", b'{"prompt": ', login=ALICE)
    assert status == 422 and "JSON" in reply["detail"][0]["msg"]
    status, _, reply = http(server.api + "png-info", {"image": "not*base64!"}, login=ALICE)
    assert status == 422 and reply["detail"][0]["loc"] == ["body", "image"] and "base64" in reply["detail"][0]["msg"]
    assert client(server).get_progress()["state"]["job_count"] == 0  # nothing was queued


def test_png_info_reads_the_parameters_chunk_back(server):
    result = client(server).txt2img(prompt="a small red circle", seed=12, **{**FAST, "steps": 3})
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=_pnginfo(result.image.info["parameters"]))
    status, _, body = http(server.api + "png-info", {"image": base64.b64encode(buffer.getvalue()).decode()},
                           login=ALICE)
    assert status == 200 and body["parameters"]["Seed"] == "12" and body["parameters"]["prompt"] == "a small red circle"


def _pnginfo(text):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def test_unsupported_endpoints_answer_501_by_name(server):
    for path in ("interrogate", "train/embedding"):  # img2img and the extras are served
        status, _, body = http(server.api + path, {}, login=ALICE)
        assert status == 501 and f"/sdapi/v1/{path} is not supported" in body["detail"], body


def test_a_disconnected_clients_job_is_cancelled(server):
    payload = json.dumps({"prompt": "a large red circle", "seed": 5, "steps": 150, "width": 128,
                          "height": 128}).encode()
    auth = base64.b64encode(b"bob:pw-bob").decode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Basic " + auth.encode() + b"\r\nContent-Length: " + str(len(payload)).encode() +
                 b"\r\n\r\n" + payload)
    bob, end = client(server, BOB), time.time() + 60
    while time.time() < end and not bob.get_progress()["state"]["sampling_step"]:
        time.sleep(0.1)
    sock.close()
    end = time.time() + 5
    while time.time() < end and bob.get_progress()["state"]["job_count"]:
        time.sleep(0.1)
    assert bob.get_progress()["state"]["job_count"] == 0 and "the client of bob went away" in server.output


def test_img2img_redraws_a_red_circle_blue(server):
    from PIL import Image

    from sdxl_ui.demo import scenes as S

    pixels, _ = S.render(S.Scene("red", "white", "circle", "center", "large"), jitter=False)
    result = client(server).img2img(images=[Image.fromarray(pixels)], prompt="a large blue circle in the center on a "
                                    "white background", denoising_strength=0.6, seed=1, **FAST)
    assert result.image.size == (128, 128) and "Denoising strength: 0.6" in result.image.info["parameters"]
    reading = S.read_scene(result.image.convert("RGB"))
    assert (reading.color, reading.shape, reading.position) == ("blue", "circle", "center"), reading


def test_img2img_with_a_mask_inpaints_only_the_mask(server):
    """webuiapi's img2img(mask_image=…): A1111's inpainting fields (mask, mask_blur, inpainting_fill,
    inpaint_full_res, …) as webuiapi sends them. A blank picture with its centre masked gets a red circle there;
    every pixel outside the blurred mask is the input's."""
    import numpy as np
    from PIL import Image, ImageDraw

    from sdxl_ui.demo import scenes as S
    from sdxl_ui.masks import prepared_mask

    blank, mask = Image.new("RGB", (128, 128), "white"), Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((24, 24, 104, 104), fill=255)
    result = client(server).img2img(images=[blank], mask_image=mask, mask_blur=4, inpainting_fill=0,
                                    prompt="a large red circle in the center on a white background",
                                    denoising_strength=1.0, seed=1, **FAST)
    image = result.image.convert("RGB")
    reading = S.read_scene(image)
    assert (reading.color, reading.shape, reading.background) == ("red", "circle", "white"), reading
    outside = np.asarray(prepared_mask(mask, 4, False)) == 0
    assert (np.asarray(image)[outside] == np.asarray(blank)[outside]).all()
    assert "Mask blur: 4, Masked content: fill" in result.image.info["parameters"]



def test_extra_single_and_batch_images_upscale_with_webuiapi(server):
    """webuiapi's extra_single_image / extra_batch_images: A1111's whole extras body as webuiapi sends it (face
    restoration fields at 0, a data: URL picture); the app upscales without its model being needed."""
    from PIL import Image

    from sdxl_ui.demo import scenes as S

    pixels, _ = S.render(S.Scene("red", "white", "circle", "center", "large"), jitter=False)
    source = Image.fromarray(pixels)
    single = client(server).extra_single_image(image=source, upscaler_1="Lanczos", upscaling_resize=2)
    assert single.image.size == (256, 256) and "Postprocess upscaler: Lanczos" in single.info
    reading = S.read_scene(single.image.convert("RGB"))
    assert (reading.color, reading.shape, reading.position) == ("red", "circle", "center"), reading
    batch = client(server).extra_batch_images(images=[source, source.resize((64, 64))], upscaler_1="Nearest",
                                              upscaling_resize=1.5)
    assert [i.size for i in batch.images] == [(192, 192), (96, 96)]
