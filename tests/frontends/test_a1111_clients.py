"""The real AUTOMATIC1111 clients replayed against one `app.py --api --model demo` (no login, as these clients
are usually set up): Open WebUI, SillyTavern, LibreChat and webuiapi, each call in the order its source makes it
(connect, list, set the model, generate with its default settings, progress, interrupt), each reply judged as that
client judges it (status, JSON shape, the fields it reads), and the pictures by the demo's scene reader.

The sequences were read from each client's source: Open WebUI v0.10.1 and v0.6.34 `backend/open_webui/routers/images.py`, SillyTavern 1.15.0
`src/endpoints/stable-diffusion.js` + `public/scripts/extensions/stable-diffusion/index.js`, LibreChat v0.7.9-rc1
`api/app/clients/tools/structured/StableDiffusion.js`, webuiapi 0.9.17 (the installed package itself).
Where a client lets its user choose the size, 128×128 is sent: the demo model's native size, as its user would."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
import requests
from tests.helpers import launched
from tests.helpers.a1111 import Server

webuiapi = pytest.importorskip("webuiapi")

SIZE = 128  # the demo model's native size
ST_SECRET = "st-user:hunter2-not-logged"  # a SillyTavern user's typed login (this server has none: ignored)


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A LoRA folder with one .safetensors file whose header carries trainer metadata (the tensors are never
    read by /loras)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("client-loras").resolve()
    save_file({"lora_unet_x.lora_down.weight": np.zeros((2, 2), dtype=np.float32)}, str(folder / "ink.safetensors"),
              metadata={"ss_output_name": "ink-style", "ss_network_dim": "2"})
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def styles_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("client-styles").resolve() / "styles.csv"
    path.write_text("name,prompt,negative_prompt\nflat,\"{prompt}, flat colours\",blurry\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, lora_folder, styles_file):
    with launched(tmp_path_factory.mktemp("clients-out"), "--api", "--model", "demo", "--lora-dir", str(lora_folder),
                  "--styles", str(styles_file), app=Server) as running:
        yield running


def b64_png(data: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert image.format == "PNG"
    return image


def judged(image, prompt_scene, attributes=("color", "background", "shape")) -> dict:
    from sdxl_ui.demo import scenes as S

    return S.read_scene(image.convert("RGB")).matches(prompt_scene, attributes)


def scene(**kw):
    from sdxl_ui.demo import scenes as S

    return S.Scene(**{"color": "red", "background": "blue", "shape": "circle", "position": "center", "size": "large",
                      **kw})


def prompt(s) -> str:
    from sdxl_ui.demo import scenes as S

    return S.prompt_for(s, ("size", "color", "shape", "background"))


def reading(image) -> str:
    from sdxl_ui.demo import scenes as S

    r = S.read_scene(image.convert("RGB"))
    return f"{r.size} {r.color} {r.shape} at the {r.position} on {r.background}"


# ---------------------------------------------------------------- Open WebUI


def open_webui_session(server):
    """Open WebUI's aiohttp/requests calls: `authorization: Basic <base64(AUTOMATIC1111_API_AUTH)>` on every call,
    which is "Basic " with an empty token when no login is set."""
    session = requests.Session()
    session.headers["authorization"] = "Basic " + base64.b64encode(b"").decode()
    return session, server.url.rstrip("/")  # AUTOMATIC1111_BASE_URL as typed, without the placeholder's slash


def open_webui_connect_and_set_model(session, base):
    """Open WebUI v0.10.1 (open-webui/open-webui, backend/open_webui/routers/images.py @ b711935): verify the URL,
    list the models, save the settings (set_image_model)."""
    assert session.get(f"{base}/sdapi/v1/options").ok  # "verify connection": only a 2xx counts
    models = session.get(f"{base}/sdapi/v1/sd-models").json()
    listed = [{"id": m["title"], "name": m["model_name"]} for m in models]  # a KeyError is its 400
    assert listed == [{"id": "demo", "name": "demo"}]  # what the server was started with, and nothing else
    for wanted in ("", listed[0]["id"]):  # IMAGE_GENERATION_MODEL: '' until the admin picks one, then the pick
        options = session.get(f"{base}/sdapi/v1/options").json()
        if wanted != options["sd_model_checkpoint"]:  # differs: the whole dict it got, with the model replaced
            reply = session.post(f"{base}/sdapi/v1/options", json={**options, "sd_model_checkpoint": wanted})
            reply.raise_for_status()
            assert reply.json() is None
    assert session.get(f"{base}/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo"


def open_webui_generate(session, base, body) -> tuple[list, str]:
    """image_generations: the model read from /options, then txt2img with no status check: `res['images']` (base64,
    a `data:` prefix allowed) and `res['info']` are read straight from the JSON."""
    assert session.get(f"{base}/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo"
    res = session.post(f"{base}/sdapi/v1/txt2img", json=body).json()
    images = [b64_png(i.split(",", 1)[1] if i.startswith("data:") else i) for i in res["images"]]
    return images, res["info"]


def test_open_webui_0_10_1_connects_lists_sets_the_model_and_generates(server):
    """Open WebUI v0.10.1 (open-webui/open-webui @ b711935, backend/open_webui/routers/images.py): its body is
    prompt, batch_size, width×height (IMAGE_SIZE, chosen 128×128 here), steps (IMAGE_STEPS, default 50); no
    sampler, scheduler or cfg (A1111's defaults: Euler, Automatic, cfg 7), then the admin's AUTOMATIC1111_PARAMS
    over it all: here {"seed": 5}, so that the judged picture is the same on every run."""
    session, base = open_webui_session(server)
    open_webui_connect_and_set_model(session, base)
    wanted = scene(color="yellow", background="black", shape="square")
    params = {"seed": 5}  # AUTOMATIC1111_PARAMS
    images, info = open_webui_generate(session, base, {"prompt": prompt(wanted), "batch_size": 1, "width": SIZE,
                                                       "height": SIZE, "steps": 50, **params})
    assert len(images) == 1 and images[0].size == (SIZE, SIZE) and isinstance(info, str)
    seed = json.loads(info)["seed"]
    assert all(judged(images[0], wanted).values()), (seed, reading(images[0]))


def test_open_webui_0_6_34_suggested_settings_draw_the_scene(server):
    """Open WebUI v0.6.34 (open-webui/open-webui tag v0.6.34, backend/open_webui/routers/images.py): the same calls,
    its body adds the admin's AUTOMATIC1111_CFG_SCALE, _SAMPLER and _SCHEDULER, here the settings its own
    placeholders suggest: "Euler a", "Karras" (a schedule-type label, as its datalist sends them), 7.0. It cannot
    send a seed: the user asks for 3 images (its `n`), and at least 2 must be judged right (one picture alone is
    right 39 times in 40 on seeds 500-539: a single random seed would fail one run in 40)."""
    session, base = open_webui_session(server)
    open_webui_connect_and_set_model(session, base)
    wanted = scene()
    body = {"prompt": prompt(wanted), "batch_size": 3, "width": SIZE, "height": SIZE, "steps": 50, "cfg_scale": 7.0,
            "sampler_name": "Euler a", "scheduler": "Karras"}
    data = session.post(f"{base}/sdapi/v1/txt2img", json=body).json()
    assert "error" not in data  # its error path reads data["error"]["message"]
    images, info = [b64_png(i) for i in data["images"]], data["info"]
    parsed = json.loads(info)
    assert (parsed["sampler_name"], parsed["scheduler"]) == ("Euler a", "Karras") and len(images) == 3
    right = [all(judged(image, wanted).values()) for image in images]
    assert sum(right) >= 2, (parsed["all_seeds"], [reading(image) for image in images])


# ---------------------------------------------------------------- SillyTavern

ST_PREFIX = "best quality, absurdres, aesthetic,"
ST_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality, normal quality, "
               "jpeg artifacts, signature, watermark, username, blurry")


def st_headers(auth: str) -> dict:
    """SillyTavern's server: `Authorization: Basic base64(auth)`, sent even when auth is '' (then "Basic ")."""
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def st_combine(prefix: str, text: str) -> str:
    """SillyTavern's combinePrefixes: each part trimmed of spaces and edge commas, joined with ', '."""
    parts = [p.strip().strip(",").strip() for p in (prefix, text)]
    return ", ".join(p for p in parts if p)


def st_body(server, auth: str, text: str, prefix: str = ST_PREFIX, seed: int | None = 7, steps: int = 20) -> dict:
    """The browser's body, which ST's server forwards verbatim (with `url` and `auth`): defaultSettings of
    public/scripts/extensions/stable-diffusion/index.js (DDIM, normal, 20 steps, scale 7, its prompt prefix and
    negative prompt), 128×128 chosen by the user. `seed` is sent when the user set one (-1 leaves it out)."""
    body = {"url": server.url.rstrip("/"), "auth": auth, "prompt": st_combine(prefix, text),
            "negative_prompt": ST_NEGATIVE, "sampler_name": "DDIM", "scheduler": "normal", "steps": steps,
            "cfg_scale": 7, "width": SIZE, "height": SIZE, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 1.0, "hr_additional_modules": [], "denoising_strength": 0.7,
            "hr_second_pass_steps": 0,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "forge_additional_modules": []},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    if seed is not None:
        body["seed"] = seed
    return body


def st_connect_list_and_set_model(server, auth: str) -> dict:
    """Connect (ping), loadSettingOptions (each list as ST reads it), set-model and its wait for idle."""
    api, headers = server.api, st_headers(auth)
    assert requests.get(api + "options", headers=headers).ok  # /api/sd/ping: only `ok`
    lists = {}
    lists["samplers"] = [x["name"] for x in requests.get(api + "samplers", headers=headers).json()]
    model = requests.get(api + "options", headers=headers).json()["sd_model_checkpoint"]
    lists["models"] = [x["title"] for x in requests.get(api + "sd-models", headers=headers).json()]
    upscalers, latent = (requests.get(api + path, headers=headers) for path in ("upscalers", "latent-upscale-modes"))
    assert upscalers.ok and latent.ok
    names = [x["name"] for x in upscalers.json()]  # a dict here is its TypeError, and then an empty list
    lists["upscalers"] = names[:1] + [x["name"] for x in latent.json()] + names[1:]
    lists["schedulers"] = [x["name"] for x in requests.get(api + "schedulers", headers=headers).json()]
    for path in ("sd-vae", "sd-modules"):  # Promise.allSettled: the first ok JSON reply must be an array
        reply = requests.get(api + path, headers=headers)
        if reply.ok:
            assert isinstance(reply.json(), list), (path, reply.text[:200])
            lists["vaes"] = ["Automatic", *(x["model_name"] for x in reply.json())]
            break
    assert model == "demo" and lists["models"] == ["demo"] and "vaes" in lists
    assert {"DDIM", "Euler a"} <= set(lists["samplers"]) and {"normal", "automatic"} <= set(lists["schedulers"])
    assert requests.post(api + "options", json={"sd_model_checkpoint": model}, headers=headers).ok  # set-model
    for _ in range(10):  # then up to 10 polls, until idle
        progress = requests.get(api + "progress", headers=headers).json()
        if progress["progress"] == 0.0 and progress["state"]["job_count"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"never idle: {progress}")
    return lists


def st_generate(server, body: dict) -> dict:
    """/api/sd/generate: /options (no forge_preset: forge_additional_modules dropped), then txt2img; a non-ok reply
    is its 500, an ok one is relayed and the browser reads data.images[0]."""
    headers = st_headers(body["auth"])
    options = requests.get(server.api + "options", headers=headers).json()
    if "forge_preset" not in options:
        body = {**body, "override_settings": {k: v for k, v in body["override_settings"].items()
                                              if k != "forge_additional_modules"}}
    reply = requests.post(server.api + "txt2img", json=body, headers=headers, timeout=300)
    assert reply.ok, reply.text[:300]
    return reply.json()


@pytest.fixture(scope="module")
def sillytavern_defaults(server):
    """SillyTavern 1.15.0 with its default settings and no login (auth ''): the lists, the model set, and one
    generation of a scene prompt after its default prompt prefix."""
    lists = st_connect_list_and_set_model(server, "")
    wanted = scene()
    data = st_generate(server, st_body(server, "", prompt(wanted)))
    return lists, wanted, data


def test_sillytavern_connects_lists_sets_the_model_and_generates(sillytavern_defaults):
    """SillyTavern 1.15.0 (SillyTavern/SillyTavern @ 7a49742, src/endpoints/stable-diffusion.js and
    public/scripts/extensions/stable-diffusion/index.js): every list is an array of what it reads, the empty
    `Basic ` header is not refused, and data.images[0] is a PNG."""
    lists, _, data = sillytavern_defaults
    from sdxl_ui.upscalers import LATENT_MODES

    # ST's dropdown: the first pixel upscaler, A1111's latent modes, then the rest (what the hires fix accepts)
    assert lists["upscalers"] == ["None", *LATENT_MODES, "Lanczos", "Nearest"] and lists["vaes"] == ["Automatic"]
    image = b64_png(data["images"][0])
    assert image.size == (SIZE, SIZE)
    info = json.loads(data["info"])
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("DDIM", 20, 7)
    assert "url" not in data["parameters"] and "auth" not in data["parameters"]


def test_sillytavern_default_prefix_and_negative_draw_the_scene(sillytavern_defaults):
    """SillyTavern's default prompt prefix 'best quality, absurdres, aesthetic,' is 30 tokens of the demo model's
    tokenizer (its vocabulary spells these words letter by letter): the scene after it is past the 32-token window,
    and is drawn only because long prompts are chunked (sdxl_ui/long_prompts.py; before: wrong on 12 of 12 seeds)."""
    _, wanted, data = sillytavern_defaults
    image = b64_png(data["images"][0])
    assert all(judged(image, wanted).values()), reading(image)


def test_sillytavern_defaults_with_the_prefix_cleared_draw_the_scene(server):
    """SillyTavern 1.15.0's default DDIM, normal, 20 steps, scale 7 and negative prompt, with the user's prompt
    prefix cleared (a setting of its own): the picture is judged right."""
    wanted = scene(color="green", background="white", shape="triangle")
    data = st_generate(server, st_body(server, "", prompt(wanted), prefix="", seed=11))
    image = b64_png(data["images"][0])
    assert all(judged(image, wanted).values()), reading(image)


def test_sillytavern_hires_fix_draws_the_scene_at_twice_the_size(server):
    """SillyTavern's "Hires. Fix" ticked: its body sends enable_hr with hr_scale, hr_upscaler, hr_second_pass_steps
    and denoising_strength (its defaults: Latent, 0.7; the user chose scale 2). The picture is 256² and judged
    right; the infotext names the second pass as A1111's does."""
    wanted = scene(color="green", background="white", shape="triangle")
    body = {**st_body(server, "", prompt(wanted), prefix="", seed=11), "enable_hr": True, "hr_scale": 2.0}
    data = st_generate(server, body)
    image = b64_png(data["images"][0])
    assert image.size == (2 * SIZE, 2 * SIZE)
    assert all(judged(image, wanted).values()), reading(image)
    info = json.loads(data["info"])
    assert "Hires upscaler: Latent" in info["infotexts"][0] and "Denoising strength: 0.7" in info["infotexts"][0]


def test_sillytavern_abort_interrupts_and_its_login_never_comes_back(server):
    """A user who typed a login in SillyTavern (sent in the Basic header and, by its server, inside the JSON body)
    aborts a generation: ST's server posts /interrupt; the job stops, the reply and the log hold no password."""
    st_connect_list_and_set_model(server, ST_SECRET)
    out = {}
    body = st_body(server, ST_SECRET, prompt(scene()), steps=150)
    thread = threading.Thread(target=lambda: out.update(data=st_generate(server, body)), daemon=True)
    thread.start()
    headers, end = st_headers(ST_SECRET), time.time() + 120
    while time.time() < end and not requests.get(server.api + "progress", headers=headers).json()["state"][
            "sampling_step"]:
        time.sleep(0.1)
    reply = requests.post(server.api + "interrupt", headers=headers)
    assert reply.ok and reply.json() == {}
    thread.join(60)
    assert out["data"]["images"] == []  # stopped before its image
    assert "auth" not in out["data"]["parameters"] and "url" not in out["data"]["parameters"]
    assert "hunter2" not in json.dumps(out["data"]) and "hunter2" not in server.output
    idle = requests.get(server.api + "progress", headers=headers).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


# ---------------------------------------------------------------- LibreChat


def test_librechat_generates_and_reads_info(server):
    """LibreChat v0.7.9-rc1 (danny-avila/LibreChat @ 62b4f3b, api/app/clients/tools/structured/StableDiffusion.js):
    plain axios, no auth header, body {prompt, negative_prompt, cfg_scale 4.5, steps 22, width, height}. Its source
    fixes the size at 1024×1024; replayed at 128×128 (the demo's native size) because 1024² takes minutes on this
    2-core CPU. It reads data.images[0] as raw base64 (`image.split(',', 1)[0]`: a `data:` prefix would break it),
    and JSON.parse(data.info) for height, width, seed and infotexts[0] (its last line: the parameters). The prompt
    stands for the LLM's tool call; the picture is judged."""
    wanted = scene(color="white", background="purple", shape="square")
    # No seed is sent, so each picture has a new one: the demo reads the shape wrong for a rare seed (4279794919 drew
    # a circle on a bf16 AMX Xeon), so as a LibreChat user would, a wrong picture is asked for once more.
    seen = []
    for _ in range(2):
        reply = requests.post(server.api + "txt2img", json={"prompt": prompt(wanted), "negative_prompt": "",
                                                            "cfg_scale": 4.5, "steps": 22, "width": SIZE,
                                                            "height": SIZE})
        assert 200 <= reply.status_code < 300, reply.text[:300]  # else 'Error making API request.'
        data = reply.json()
        image = data["images"][0]
        assert not image.startswith("data:")
        png = b64_png(image.split(",", 1)[0])
        info = json.loads(data["info"])
        assert (info["width"], info["height"]) == (SIZE, SIZE) and isinstance(info["seed"], int)
        params_line = info["infotexts"][0].split("\n").pop()
        assert params_line.startswith("Steps: 22, Sampler: Euler") and "CFG scale: 4.5" in params_line
        assert f"Seed: {info['seed']}" in params_line and png.size == (SIZE, SIZE)
        seen.append((info["seed"], reading(png)))
        if all(judged(png, wanted).values()):
            break
    else:
        pytest.fail(f"two unseeded pictures judged wrong: {seen}")


# ---------------------------------------------------------------- webuiapi


def test_webuiapi_helpers_answer_in_a1111s_shape(server, lora_folder):
    """webuiapi 0.9.17 (mix1009/sdwebuiapi @ ce232f0, webuiapi/webuiapi.py, the installed package): the constructor
    reads /scripts; every helper is `response.json()` without a status check, the util_* ones index into it."""
    api = webuiapi.WebUIApi(port=server.port)
    api.util_wait_for_ready(check_interval=0.1)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert api.get_sd_vae() == [] and api.get_hypernetworks() == []
    assert [m["name"] for m in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]
    assert api.get_face_restorers() == [] and api.get_realesrgan_models() == []
    assert api.get_prompt_styles() == [{"name": "flat", "prompt": "{prompt}, flat colours", "negative_prompt": "blurry"}]
    assert api.get_embeddings()["loaded"] == {} and api.get_embeddings()["skipped"] == {}
    assert api.get_loras() == [{"name": "ink", "alias": "ink-style", "path": "ink.safetensors",
                                "metadata": {"ss_output_name": "ink-style", "ss_network_dim": "2"}}]
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["nowebui"] is False and flags["api_auth"] is None
    assert flags["lora_dir"] == lora_folder.name and flags["styles_file"] == ["styles.csv"]
    assert flags["port"] == server.port and flags["listen"] is False and flags["share"] is False
    assert str(lora_folder.parent) not in json.dumps(flags)  # no server path
    assert api.refresh_checkpoints() is None
    for path in ("refresh-loras", "refresh-vae"):
        reply = requests.post(server.api + path)
        assert reply.status_code == 200 and reply.json() is None
    assert api.util_get_model_names() == ["demo"]
    assert {"Euler a", "DDIM", "DPM++ 2M"} <= set(api.util_get_sampler_names())
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())


def test_webuiapi_sets_the_model_generates_and_interrupts(server):
    """webuiapi 0.9.17: util_set_model, txt2img with its own defaults (Euler a, automatic, 20 steps, cfg 7, eta 1,
    denoising 0.7, …) at the user's 128×128 with a seed of the script's, progress, interrupt and skip (each must
    answer JSON)."""
    api = webuiapi.WebUIApi(port=server.port)
    api.util_set_model("demo")
    assert api.util_get_current_model() == "demo"
    wanted = scene(color="blue", background="yellow", shape="circle")
    result = api.txt2img(prompt=prompt(wanted), width=SIZE, height=SIZE, seed=21)
    assert result.image.size == (SIZE, SIZE) and result.info["sampler_name"] == "Euler a"
    assert result.parameters["steps"] == 20 and result.parameters["prompt"] == prompt(wanted)
    assert all(judged(result.image, wanted).values()), (result.info["seed"], reading(result.image))
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert api.interrupt() == {} and api.skip() in ({}, None)


# ---------------------------------------------------------------- what every client meets


def test_sd_models_lists_only_what_the_server_was_started_with(server):
    """No `tiny` (random-weight noise for everyone) unless the operator named it: POST /options refuses it by name."""
    reply = requests.post(server.api + "options", json={"sd_model_checkpoint": "tiny"})
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["msg"] == "sd_model_checkpoint: unknown model; known: demo (got 'tiny')"


def test_endpoints_without_a_counterpart_answer_a1111s_error_dict(server):
    for path in ("interrogate", "train/embedding"):  # extras are served (test_a1111_extras.py)
        reply = requests.post(server.api + path, json={})
        assert reply.status_code == 501 and set(reply.json()) == {"error", "detail", "body", "errors"}
