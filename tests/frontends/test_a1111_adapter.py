"""The AUTOMATIC1111 adapter and the shared queue, without a server: request mapping, refusals by name, the
response shape, first-come-first-served order of page and API jobs, and per-caller interrupt."""
from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from sdxl_ui.a1111.adapter import MAX_ITER, detail_422, info_json, map_sampler, parse_txt2img
from sdxl_ui.a1111.jobs import CallerJobs, DeviceQueue, QueuedBackend
from sdxl_ui.jobs import Capabilities
from sdxl_ui.optimizations.registry import SWITCHES
from sdxl_ui.schema import (ErrorEvent, ErrorKind, LogEvent, ProgressEvent, ResultEvent, Schedule, Scheduler,
                            ValidationError)


def until(condition, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "condition not met in time"
        time.sleep(0.01)


def parse(**body):
    return parse_txt2img({"prompt": "a red circle", **body}, native=128, model="demo", switches=SWITCHES)


S, K = Scheduler, Schedule


@pytest.mark.parametrize("sampler, scheduler, ours", [
    ("Euler", None, (S.EULER, K.AUTOMATIC)), ("Euler a", "Automatic", (S.EULER_A, K.AUTOMATIC)),
    ("DPM++ 2M", "Karras", (S.DPMPP_2M, K.KARRAS)), ("DPM++ 2M", "automatic", (S.DPMPP_2M, K.AUTOMATIC)),
    ("DPM++ 2M", "Uniform", (S.DPMPP_2M, K.UNIFORM)), ("DPM++ 2M Karras", None, (S.DPMPP_2M, K.KARRAS)),
    ("DDIM", None, (S.DDIM, K.AUTOMATIC)), ("UniPC", "", (S.UNIPC, K.AUTOMATIC)),
    ("k_euler_a", None, (S.EULER_A, K.AUTOMATIC)), (None, None, (S.AUTO, K.AUTOMATIC)),
    ("DDIM", "normal", (S.DDIM, K.NORMAL)),  # SillyTavern's defaults
    ("Euler a", "Karras", (S.EULER_A, K.KARRAS)),  # Open WebUI's suggestion
    ("DPM++ 2M SDE Exponential", None, (S.DPMPP_2M_SDE, K.EXPONENTIAL)),  # a pre-1.9 combined name
    ("DPM++ 2M SDE Heun", None, (S.DPMPP_2M_SDE_HEUN, K.AUTOMATIC)), ("euler a sgmuniform", None,
                                                                      (S.EULER_A, K.SGM_UNIFORM)),
    ("LMS", "SGM Uniform", (S.LMS, K.SGM_UNIFORM)), ("Heun", "sgm_uniform", (S.HEUN, K.SGM_UNIFORM)),
    ("PLMS", "Align Your Steps", (S.PLMS, K.ALIGN_YOUR_STEPS)), ("LCM", "beta", (S.LCM, K.BETA)),
    (None, "Karras", (S.EULER, K.KARRAS))])  # a schedule type alone: A1111's default sampler with it
def test_samplers_map_to_ours(sampler, scheduler, ours):
    assert map_sampler(sampler, scheduler) == ours


def test_every_sampler_and_schedule_type_a1111_lists_is_accepted_by_its_name_label_and_aliases():
    from sdxl_ui.a1111.adapter import SAMPLERS, SCHEDULERS

    for sampler in SAMPLERS:
        for name in (sampler["name"], *sampler["aliases"]):
            for schedule in SCHEDULERS:
                for kind in (schedule["name"], schedule["label"], *(schedule["aliases"] or ())):
                    assert map_sampler(name, kind)[1].value == schedule["name"]
    assert len(SAMPLERS) == 21 and len(SCHEDULERS) == 12


@pytest.mark.parametrize("sampler, scheduler, field", [
    ("Nonexistent", None, "sampler_name"), ("Euler", "bogus", "scheduler"), (3, None, "sampler_name"),
    ("Euler", 5, "scheduler")])
def test_an_unknown_sampler_or_schedule_type_is_refused_by_name(sampler, scheduler, field):
    with pytest.raises(ValidationError) as err:
        map_sampler(sampler, scheduler)
    assert err.value.field == field


def test_a1111_field_semantics():
    job = parse(width=515, height=1023, prompt="")  # sizes rounded down to a multiple of 8; an empty prompt
    assert (job.request.width, job.request.height, job.request.prompt) == (512, 1016, "")
    named = parse(steps=22)
    assert named.request.techniques["steps_policy"].value == "off"  # a client that names its steps gets them
    assert "steps_policy" not in parse().request.techniques  # no steps: A1111's 50, under the host's policy
    operator = parse_txt2img({"prompt": "x", "steps": 22}, 128, "demo", SWITCHES, steps_policy=True)
    assert "steps_policy" not in operator.request.techniques  # the operator applies the policy to the API too
    clip = parse(override_settings={"CLIP_stop_at_last_layers": 2, "sd_vae": "other.safetensors"})
    assert clip.request.clip_skip == 1 and "override_settings.sd_vae" in clip.reasons
    sillytavern = parse(restore_faces=False, tiling=False, subseed=-1, eta=1.0, s_noise=1, url="http://x",
                        auth="user:secret", alwayson_scripts={"ADetailer": {"args": [True]}})
    assert set(sillytavern.reasons) == {"alwayson_scripts"}  # defaults ask for nothing; the script is listed
    info = json.loads(info_json(sillytavern, [], "demo"))
    assert "alwayson_scripts" in info["extra_generation_params"]["sdxl_ui ignored"]
    nearest = parse(sampler_name="DPM++ 2S a", scheduler="sgm_uniform")
    assert any("DPM++ 2S" in n for n in nearest.notes) and any("timestep spacing" in n for n in nearest.notes)
    assert "DPM++ 2S" in json.loads(info_json(nearest, [], "demo"))["extra_generation_params"]["sdxl_ui sampler"][0]


def test_styles_apply_as_a1111_does():
    styles = {"photo": ("a photo of {prompt}, sharp", "blurry"), "tail": ("film grain", "")}
    job = parse_txt2img({"prompt": "a fox", "negative_prompt": "text", "styles": ["photo", "tail", "none"]},
                        128, "demo", SWITCHES, styles=styles)
    assert job.request.prompt == "a photo of a fox, sharp, film grain"
    assert job.request.negative_prompt == "text, blurry" and "styles.none" in job.reasons


@pytest.mark.parametrize("body, field", [
    ({"steps": 0}, "steps"), ({"steps": 10**9}, "steps"), ({"width": 60}, "width"), ({"height": 4096}, "height"),
    ({"batch_size": -1}, "batch_size"), ({"n_iter": MAX_ITER + 1}, "n_iter"), ({"seed": -2}, "seed"),
    ({"cfg_scale": 99}, "cfg_scale"), ({"prompt": "\ud800"}, "prompt"), ({"prompt": 5}, "prompt"),
    ({"sampler_name": "Heunn"}, "sampler_name"), ({"enable_hr": True, "hr_scale": 9}, "hr_scale"),
    ({"enable_hr": "yes"}, "enable_hr"), ({"enable_hr": True, "denoising_strength": 0}, "denoising_strength"),
    ({"enable_hr": True, "hr_resize_x": 100}, "hr_resize_x"),
    ({"script_name": "x/y/z plot"}, "script_name"), ({"send_images": "yes"}, "send_images"),
    ({"styles": "photo"}, "styles"), ({"override_settings": {"CLIP_stop_at_last_layers": 99}},
                                      "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"sd_model_checkpoint": "other"}}, "override_settings.sd_model_checkpoint"),
    ({"sdxl_ui": {"quality": "best"}}, "sdxl_ui.quality"), ({"sdxl_ui": {"techniques": {"x": "on"}}},
                                                            "sdxl_ui.techniques")])
def test_bad_input_names_the_field_and_the_value(body, field):
    with pytest.raises(ValidationError) as err:
        parse(**body)
    assert err.value.field == field
    detail = detail_422(err.value)["detail"][0]
    assert detail["loc"] == ["body", *field.split(".")] and field.split(".")[-1] in detail["msg"]
    json.dumps(detail_422(err.value))  # always serialisable, even for a lone surrogate


def test_a_request_maps_to_ours_with_seeds_per_iteration():
    job = parse(steps=12, cfg_scale=5, width=64, height=96, seed=7, batch_size=2, n_iter=3, sampler_name="Euler a",
                eta=1.0, s_churn=0, send_images=False)
    req = job.request
    assert (req.steps, req.guidance, req.width, req.height, req.images, req.scheduler) == (
        12, 5.0, 64, 96, 2, Scheduler.EULER_A)
    assert [job.iteration(k).seed for k in range(3)] == [7, 9, 11] and job.all_seeds == [7, 8, 9, 10, 11, 12]
    assert job.reasons == {} and job.send_images is False and job.save_images is False  # eta 1, s_churn 0: defaults
    assert parse().request.width == 128  # no size: the model's native size


def test_seed_minus_one_is_random_and_reported():
    seeds = {parse(seed=-1).seed for _ in range(5)}
    assert len(seeds) > 1 and all(s >= 0 for s in seeds)


def test_the_quality_preset_is_reachable_through_the_extension_field():
    job = parse(steps=30, cfg_scale=7, sampler_name="Euler a", sdxl_ui={"quality": "fast",
                                                                        "techniques": {"feature_cache": "off"}})
    req = job.request
    assert (req.requested_steps, req.guidance_scale, req.sampler) == (20, 6.0, Scheduler.DPMPP_2M_KARRAS)
    assert req.techniques == {"feature_cache": "off"}
    assert parse(override_settings={"sdxl_ui_quality": "fast"}).request.quality.value == "fast"


def test_info_is_automatic1111s_json_string():
    job = parse(seed=5, steps=10, sampler_name="DPM++ 2M", scheduler="Karras")

    class R:
        seed, steps_run, parameters = 5, 7, "a red circle\nNegative prompt: \nSteps: 10, Seed: 5"

    info = json.loads(info_json(job, [R()], "demo"))
    assert info["all_seeds"] == [5] and info["seed"] == 5 and info["infotexts"] == [R.parameters]
    assert (info["sampler_name"], info["scheduler"], info["steps"], info["width"]) == ("DPM++ 2M", "Karras", 10, 128)
    assert info["all_prompts"] == ["a red circle"]


class FakeBackend:
    """A backend whose jobs take ``steps`` × ``step_s`` and record the order they started in."""

    concurrency = 1
    capabilities = Capabilities()  # nothing beyond the protocol; saves on this machine

    def __init__(self, steps=5, step_s=0.02):
        self.steps, self.step_s, self.started, self.running, self.overlap = steps, step_s, [], 0, False
        self.lock = threading.Lock()

    def generate(self, request, cancel=None, output_path=None):
        with self.lock:
            self.running += 1
            self.overlap |= self.running > 1
            self.started.append(request.prompt)
        try:
            for step in range(1, self.steps + 1):
                if cancel is not None and cancel.cancelled:
                    yield ErrorEvent(f"cancelled at step {step}/{self.steps}", "cancelled")
                    return
                time.sleep(self.step_s)
                yield ProgressEvent(step, self.steps, 0.1, 0.1, 0.01, "", None)
            from PIL import Image

            yield ResultEvent(Image.new("RGB", (8, 8)), None, request.seed or 0, 0, self.steps, self.steps, False, None, None, "fake",
                              "cpu", "fp32", request.prompt)
        finally:
            with self.lock:
                self.running -= 1


def test_page_and_api_jobs_share_one_line_in_arrival_order():
    backend = FakeBackend()
    queue = DeviceQueue(lambda: 1, max_waiting=8)
    page, jobs = QueuedBackend(backend, queue), CallerJobs(queue, backend)
    threads = []
    for i in range(6):  # arrival order: job0 (page), job1 (API), job2 (page), …
        if i % 2:
            jobs.submit(f"api{i}", parse(prompt=f"job{i}"))
        else:
            events = page.generate(parse(prompt=f"job{i}").request)
            next(events)  # in line now (its first event: a progress step, or its place in the line)
            threads.append(threading.Thread(target=lambda g=events: list(g)))
            threads[-1].start()
    for t in threads:
        t.join(10)
    end = time.time() + 10
    while len(backend.started) < 6 and time.time() < end:
        time.sleep(0.02)
    assert backend.started == [f"job{i}" for i in range(6)] and not backend.overlap
    assert page.concurrency == 1 + 8  # the page's gradio queue lets its jobs through to the shared line


def test_api_jobs_use_a_scratch_folder_only_where_the_backend_saves_on_this_machine():
    """save_images false: a scratch path here, removed after; Ray workers (local_files False) save in their own
    outputs folder, since a path here is no path on another machine."""
    remote = FakeBackend()
    remote.capabilities = Capabilities(start=True, local_files=False)
    queue = DeviceQueue(lambda: 1, max_waiting=1)
    assert CallerJobs(queue, FakeBackend()).scratch and not CallerJobs(queue, remote).scratch


def test_a_full_line_refuses_page_and_api_jobs():
    backend = FakeBackend(steps=20)
    queue = DeviceQueue(lambda: 1, max_waiting=1)
    jobs = CallerJobs(queue, backend)
    running = jobs.submit("a", parse())
    until(lambda: running.state == "running")
    assert jobs.submit("b", parse()) is not None  # waits
    assert jobs.submit("c", parse()) is None  # full
    events = list(QueuedBackend(backend, queue).generate(parse().request))
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.kind is ErrorKind.BUSY and "queue full" in error.message


def test_interrupt_and_progress_act_on_the_callers_own_job():
    backend = FakeBackend(steps=100, step_s=0.02)
    queue = DeviceQueue(lambda: 1, max_waiting=4)
    jobs = CallerJobs(queue, backend)
    alice, bob = jobs.submit("alice", parse(n_iter=1)), jobs.submit("bob", parse(steps=5))
    until(lambda: alice.step > 0)
    assert jobs.current("alice").state == "running" and jobs.current("bob").state == "queued"
    assert jobs.current("carol") is None and not jobs.interrupt("carol")
    assert alice.step > 0 and 0 < alice.progress < 1
    jobs.interrupt("alice")
    assert alice.done.wait(1.0) and alice.results == [] and alice.error is None
    assert bob.done.wait(5.0) and len(bob.results) == 1  # the other user's job finishes


def test_a_job_interrupted_while_waiting_ends_without_images_and_without_error():
    backend = FakeBackend(steps=100, step_s=0.02)
    queue = DeviceQueue(lambda: 1, max_waiting=4)
    jobs = CallerJobs(queue, backend)
    first, waiting = jobs.submit("alice", parse()), jobs.submit("bob", parse())
    until(lambda: first.state == "running")
    jobs.interrupt("bob")
    assert waiting.done.wait(2.0) and waiting.results == [] and waiting.error is None and queue.length() == 0
    jobs.interrupt("alice")
    assert first.done.wait(2.0)


def test_skip_goes_on_with_the_next_batch():
    backend = FakeBackend(steps=30, step_s=0.02)
    queue = DeviceQueue(lambda: 1, max_waiting=4)
    jobs = CallerJobs(queue, backend)
    job = jobs.submit("alice", parse(n_iter=2))
    until(lambda: job.step > 0)
    jobs.skip("alice")
    assert job.done.wait(5.0) and len(job.results) == 1 and job.error is None


def test_a_page_job_waiting_in_line_says_so_and_can_be_cancelled():
    from sdxl_ui.jobs import CancelToken

    backend = FakeBackend(steps=50, step_s=0.02)
    queue = DeviceQueue(lambda: 1, max_waiting=4)
    first = CallerJobs(queue, backend).submit("api", parse())
    until(lambda: first.state == "running")
    token = CancelToken()
    events = []
    gen = QueuedBackend(backend, queue).generate(parse().request, cancel=token)
    events.append(next(gen))
    token.cancel()
    events += list(gen)
    assert isinstance(events[0], LogEvent) and "1 job(s) ahead" in events[0].message
    assert events[-1].kind is ErrorKind.CANCELLED and queue.length() == 0


def _app(backend, **config):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sdxl_ui.a1111 import A1111Api, ApiConfig
    from sdxl_ui.settings import AppSettings

    backend.settings = AppSettings(model="demo")
    backend.native_size = lambda: 64
    api = A1111Api(backend, ApiConfig(**config))
    return TestClient(FastAPI(routes=api.routes()))


def test_failed_api_logins_go_through_the_login_throttle():
    from sdxl_ui.logins import LoginThrottle

    throttle = LoginThrottle(free=2, lock_after=4, base_delay_s=0.05, max_delay_s=0.1)
    http = _app(FakeBackend(), logins={"alice": "pw"}, throttle=throttle)
    assert http.get("/sdapi/v1/samplers").status_code == 401  # no credentials: not counted
    assert http.get("/sdapi/v1/samplers", auth=("alice", "pw")).status_code == 200
    codes = [http.get("/sdapi/v1/samplers", auth=("alice", "no")).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 401]
    locked = http.get("/sdapi/v1/samplers", auth=("alice", "pw"))  # locked out: even the right password
    assert locked.status_code == 429 and "Too many failed logins" in locked.json()["detail"]


def test_max_jobs_per_user_answers_429_for_api_callers():
    http = _app(FakeBackend(steps=1, step_s=0.0), max_jobs_per_user=1)
    body = {"prompt": "a red circle", "seed": 1, "steps": 1}
    assert http.post("/sdapi/v1/txt2img", json=body).status_code == 200
    second = http.post("/sdapi/v1/txt2img", json=body)
    assert second.status_code == 429 and "max_jobs_per_user" in second.json()["detail"]
    assert second.headers["retry-after"]


def test_a_full_line_answers_503_with_retry_after():
    backend = FakeBackend(steps=200, step_s=0.02)
    http = _app(backend, queue_size=0)
    busy = threading.Thread(target=lambda: http.post("/sdapi/v1/txt2img", json={"prompt": "long", "seed": 1}))
    busy.start()
    until(lambda: backend.started)
    refused = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1})
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    assert set(refused.json()) == {"error", "detail", "body", "errors"} and "queue full" in refused.json()["detail"]
    http.post("/sdapi/v1/interrupt")
    busy.join(10)


def test_the_api_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sdxl_ui.a1111, sdxl_ui.a1111.routes; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_only_the_operator_switches_the_model():
    backend = FakeBackend()
    switched = []
    backend.reconfigure = lambda settings: switched.append(settings.model)
    backend.preload_in_background = lambda: None
    http = _app(backend, logins={"alice": "a", "bob": "b"}, operator="alice", models=("tiny",))
    refused = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}, auth=("bob", "b"))
    assert refused.status_code == 403 and "operator" in refused.json()["detail"] and switched == []
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}, auth=("alice", "a")).json() is None
    assert switched == ["tiny"]
    nobody = _app(backend, models=("tiny",))  # no login: only a client on this machine (TestClient's peer: "testclient")
    assert nobody.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 403


@pytest.mark.parametrize("body", [
    {"steps": 22, "sampler_name": "DDIM", "scheduler": "normal", "cfg_scale": 7},  # SillyTavern's defaults
    {"sampler_name": "Euler a", "scheduler": "Karras", "width": 130, "height": 70},  # Open WebUI's suggestion
    {"steps": 3, "override_settings": {"CLIP_stop_at_last_layers": 2}, "tiling": True}])
def test_info_and_the_infotext_agree_on_every_field(tiny_service, body):
    from tests.helpers import run

    from sdxl_ui.metadata import parse_parameters

    job = parse_txt2img({"prompt": "a red fox", "seed": 3, **body}, native=64, model="tiny", switches=SWITCHES)
    out = run(tiny_service, job.request)
    assert not out["errors"], out["errors"]
    info, text = json.loads(info_json(job, out["results"], "tiny")), parse_parameters(out["results"][0].parameters)
    assert int(text["Steps"]) == info["steps"] == body.get("steps", 35)  # named steps as asked; else 50 × 0.7
    assert text["Sampler"].startswith(info["sampler_name"]) and int(text["Seed"]) == info["seed"] == 3
    assert text["Size"] == f"{info['width']}x{info['height']}" and float(text["CFG scale"]) == info["cfg_scale"]
    assert text.get("Schedule type", "Automatic") == info["scheduler"]
    assert int(text.get("Clip skip", 1)) == info["clip_skip"]
    assert ("Tiling" in text) == bool(body.get("tiling"))


def test_sd_models_lists_the_started_model_and_the_operators_api_models_only():
    backend = FakeBackend()
    switched = []
    backend.reconfigure = lambda settings: switched.append(str(settings.model))
    backend.preload_in_background = lambda: None
    http = _app(backend, logins={"alice": "a"}, operator="alice", models=("/srv/models/my-sdxl", "demo"))
    titles = [m["title"] for m in http.get("/sdapi/v1/sd-models", auth=("alice", "a")).json()]
    assert titles == ["demo", "my-sdxl"]  # the started one first, a folder by its name, never twice
    refused = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}, auth=("alice", "a"))
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["msg"] == "sd_model_checkpoint: unknown model; known: demo, my-sdxl (got 'tiny')"
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": ""}, auth=("alice", "a")).json() is None
    assert switched == []  # "" (Open WebUI before a model is chosen) changes nothing
    everything = http.get("/sdapi/v1/options", auth=("alice", "a")).json()
    assert http.post("/sdapi/v1/options", json=everything, auth=("alice", "a")).json() is None  # posted back whole
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "my-sdxl"}, auth=("alice", "a")).json() is None
    assert switched == ["/srv/models/my-sdxl"]  # the real folder is loaded; clients only ever saw its name


def test_the_listing_endpoints_answer_in_a1111s_shape(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from sdxl_ui.a1111.catalog import EMPTY_LISTS

    save_file({"w": np.zeros(1, dtype=np.float32)}, str(tmp_path / "b.safetensors"), metadata={"ss_output_name": "bee"})
    save_file({"w": np.zeros(1, dtype=np.float32)}, str(tmp_path / "a.SAFETENSORS"))
    (tmp_path / "c.txt").write_text("x")
    backend = FakeBackend()
    http = _app(backend, logins={"alice": "a"}, styles={"s": ("{prompt}, p", "n")},
                flags={"share": False, "gradio_auth": "***"})
    backend.settings = backend.settings.with_(lora_dir=tmp_path)
    for path in EMPTY_LISTS:
        assert http.get(f"/sdapi/v1/{path}").status_code == 401  # the same login as every route
        reply = http.get(f"/sdapi/v1/{path}", auth=("alice", "a"))
        assert reply.status_code == 200 and reply.json() == [], path
    assert http.get("/sdapi/v1/embeddings", auth=("alice", "a")).json() == {"loaded": {}, "skipped": {}}
    assert http.get("/sdapi/v1/prompt-styles", auth=("alice", "a")).json() == [
        {"name": "s", "prompt": "{prompt}, p", "negative_prompt": "n"}]
    assert http.get("/sdapi/v1/loras", auth=("alice", "a")).json() == [
        {"name": "a", "alias": "a", "path": "a.SAFETENSORS", "metadata": {}},
        {"name": "b", "alias": "bee", "path": "b.safetensors", "metadata": {"ss_output_name": "bee"}}]
    flags = http.get("/sdapi/v1/cmd-flags", auth=("alice", "a")).json()
    assert flags["api_auth"] == "***" and flags["gradio_auth"] == "***" and flags["lora_dir"] == tmp_path.name
    assert "pw" not in json.dumps(flags) and str(tmp_path) not in json.dumps(flags)
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings"):
        reply = http.post(f"/sdapi/v1/{path}", auth=("alice", "a"))
        assert reply.status_code == 200 and reply.json() is None, path
    for path in ("skip", "interrupt"):
        assert http.post(f"/sdapi/v1/{path}", auth=("alice", "a")).json() == {}
    idle = http.get("/sdapi/v1/progress", auth=("alice", "a")).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["eta_relative"] == 0
    reply = http.post("/sdapi/v1/interrogate", json={}, auth=("alice", "a"))
    assert reply.status_code == 501 and set(reply.json()) == {"error", "detail", "body", "errors"}
    assert "cmd-flags" in reply.json()["detail"]  # the supported list names the new endpoints


def test_cmd_flags_from_the_command_line_show_no_secret_and_no_path():
    from types import SimpleNamespace

    from sdxl_ui.a1111 import cmd_flags

    args = SimpleNamespace(host="0.0.0.0", share=True, styles="/home/op/private/styles.csv")
    assert cmd_flags(args, [("op", "pw-op")]) == {"listen": True, "server_name": "0.0.0.0", "share": True,
                                                   "gradio_auth": "***", "styles_file": ["styles.csv"]}


def _png_base64(image) -> str:
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_img2img_reads_the_picture_and_strength_and_refuses_a_bad_picture_or_mask():
    from PIL import Image

    from sdxl_ui.a1111.img2img import parse_img2img

    picture = Image.new("RGB", (96, 64), (220, 40, 40))
    job = parse_img2img({"prompt": "a blue circle", "init_images": [_png_base64(picture)], "denoising_strength": 0.4,
                         "seed": 3}, 128, "demo")
    request = job.request
    assert request.kind == "img2img" and request.strength == 0.4 and request.init_image.size == (96, 64)
    assert (request.width, request.height) == (96, 64)  # no width or height sent: the picture's own size
    assert job.echo["denoising_strength"] == 0.4
    url = "data:image/png;base64," + _png_base64(picture)
    assert parse_img2img({"prompt": "x", "init_images": [url], "width": 128, "height": 128}, 128,
                         "demo").request.width == 128
    for body, field in [({"prompt": "x"}, "init_images"),
                        ({"prompt": "x", "init_images": ["not base64!"]}, "init_images[0]"),
                        ({"prompt": "x", "init_images": [base64.b64encode(b"hello").decode()]}, "init_images[0]"),
                        ({"prompt": "x", "init_images": [_png_base64(picture)], "denoising_strength": 2},
                         "denoising_strength"),
                        ({"prompt": "x", "init_images": [_png_base64(picture)],
                          "mask": _png_base64(Image.new("L", (32, 32), 255))}, "mask"),
                        ({"prompt": "x", "init_images": [_png_base64(picture)], "mask": "nope"}, "mask"),
                        ({"prompt": "x", "init_images": [_png_base64(picture)],
                          "mask": _png_base64(Image.new("L", (96, 64), 255)), "inpainting_fill": 7},
                         "inpainting_fill"),
                        ({"prompt": "x", "init_images": [_png_base64(picture)],
                          "mask": _png_base64(Image.new("L", (96, 64), 255)), "mask_blur": 500}, "mask_blur")]:
        with pytest.raises(ValidationError) as caught:
            parse_img2img(body, 128, "demo")
        assert caught.value.field == field, (body.keys(), caught.value)


def test_img2img_reads_a1111s_inpainting_options_and_txt2img_its_hires_fix():
    from PIL import Image

    from sdxl_ui.a1111.img2img import parse_img2img
    from sdxl_ui.edits import MaskedContent

    picture, mask = Image.new("RGB", (96, 64), (220, 40, 40)), Image.new("L", (96, 64), 255)
    job = parse_img2img({"prompt": "x", "init_images": [_png_base64(picture)], "mask": _png_base64(mask),
                         "mask_blur": 8, "inpainting_fill": 2, "inpaint_full_res": 1,
                         "inpaint_full_res_padding": 16, "inpainting_mask_invert": 0, "resize_mode": 2}, 128, "demo")
    request = job.request
    assert request.kind == "inpaint" and request.mask.size == (96, 64)
    assert (request.inpaint.blur, request.inpaint.content, request.inpaint.only_masked, request.inpaint.padding,
            request.inpaint.invert) == (8, MaskedContent.LATENT_NOISE, True, 16, False)
    assert "resize_mode" in job.reasons and job.echo["inpainting_fill"] == 2
    defaults = parse_img2img({"prompt": "x", "init_images": [_png_base64(picture)], "mask": _png_base64(mask)}, 128,
                             "demo").request.inpaint  # A1111's API defaults: fill, blur 4, whole picture
    assert (defaults.content, defaults.blur, defaults.only_masked) == (MaskedContent.FILL, 4, False)
    hires = parse_txt2img({"prompt": "x", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
                           "hr_second_pass_steps": 6, "denoising_strength": 0.45, "hr_sampler_name": "Euler"},
                          128, "demo")
    fix = hires.request.hires
    assert hires.request.kind == "hires" and (fix.scale, fix.upscaler, fix.steps, fix.strength) == (
        1.5, "Lanczos", 6, 0.45)
    assert "denoising_strength" not in hires.reasons and "hr_sampler_name" in hires.reasons
    plain = parse_txt2img({"prompt": "x", "enable_hr": False, "denoising_strength": 0.45}, 128, "demo")
    assert plain.request.hires is None and "denoising_strength" in plain.reasons


def test_img2img_is_a_route_whose_refusals_are_422_naming_the_field():
    client = _app(FakeBackend())
    answer = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["%%%"]})
    assert answer.status_code == 422 and "init_images[0]" in answer.text
    from PIL import Image

    ok = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [_png_base64(Image.new("RGB", (64, 64)))],
                                                "denoising_strength": 0.5})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    assert ok.json()["parameters"]["denoising_strength"] == 0.5
