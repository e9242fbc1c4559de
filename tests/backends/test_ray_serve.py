"""Issue 14: the Ray Serve backend, with the tiny model and two CPU replicas on one small local Ray instance.

One Ray instance for the whole module (no dashboard, a 100 MB object store, 2 CPUs, its own temp folder); every
test uses the two replicas it started. The page, the API and a job's events are the same as with the in-process
service (the seam: sdxl_ui.backends.Backend).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from tests.helpers import RELIABILITY, run

ray = pytest.importorskip("ray", reason="Ray Serve is optional: pip install -r requirements-serve.txt")
pytestmark = pytest.mark.ray

from sdxl_ui.backends import Backend, CancelToken  # noqa: E402
from sdxl_ui.backends.ray_serve import RayBackend  # noqa: E402
from sdxl_ui.metadata import parse_parameters, read_parameters  # noqa: E402
from sdxl_ui.schema import (ErrorEvent, ErrorKind, GenerationRequest, ProgressEvent, ResultEvent,  # noqa: E402
                             ServiceState)
from sdxl_ui.settings import AppSettings  # noqa: E402

READY_TIMEOUT = 240  # two replicas load the tiny model on a busy 2-core CI host


def ready(backend, n: int, timeout: float = READY_TIMEOUT) -> list[dict]:
    end = time.time() + timeout
    while time.time() < end:
        replicas = [r for r in backend.replicas() if r.get("state") == "idle"]
        if len(replicas) >= n:
            return replicas
        time.sleep(0.5)
    raise AssertionError(f"{n} idle replicas not ready within {timeout} s: {backend.replicas()}")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this pytest process by another test: run this file on its own")
    temp = tempfile.mkdtemp(prefix="sdxlray")  # short: Ray's socket paths must stay under 107 characters
    outputs = tmp_path_factory.mktemp("ray-outputs")
    backend = RayBackend(AppSettings(model="tiny", outputs=outputs, device="cpu"), workers=2, cpus_per_worker=1,
                         ray_init=dict(num_cpus=3, object_store_memory=100 * 1024 * 1024, _temp_dir=temp))
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init installs its own in the driver (this pytest process)
    try:
        backend.start()
        ready(backend, 2)
        yield backend
    finally:
        backend.shutdown(60)
        signal.signal(signal.SIGTERM, sigterm)
        shutil.rmtree(temp, ignore_errors=True)
    assert not ray.is_initialized(), "the Ray instance this app started was left running"


def collect(backend, request, cancel=None, **kwargs) -> dict:
    out = run(backend, request, cancel=cancel, **kwargs)
    # Which replica ran the job: the events' own field (never the log text).
    out["worker"] = next((e.replica for e in out["progress"] + out["results"] + out["errors"] if e.replica), None)
    return out


def test_both_backends_are_the_same_seam(pool, tmp_path):
    from sdxl_ui.service import GenerationService

    assert isinstance(pool, Backend) and isinstance(GenerationService(AppSettings(model="tiny")), Backend)
    assert pool.concurrency == 2 and GenerationService.concurrency == 1


def test_events_arrive_as_they_do_locally(pool):
    out = collect(pool, GenerationRequest(prompt="a red fox", steps=10, seed=5))
    assert not out["errors"], out["errors"]
    result = out["results"][0]
    assert (result.seed, result.steps_requested, result.steps_run, result.device) == (5, 10, 7, "cpu")
    assert [p.step for p in out["progress"]] == list(range(1, 8))  # every step, with ETA and previews
    assert all(p.eta_s is not None for p in out["progress"]) and any(p.preview is not None for p in out["progress"])
    assert out["logs"][0].startswith("🖥 Worker ") and "pid " in out["logs"][0]  # which replica ran it, for people
    # ... and for code: every event carries the job's id and the replica that ran it.
    events = out["progress"] + out["results"]
    assert out["worker"] in {r["replica"] for r in pool.replicas()}
    assert {e.replica for e in events} == {out["worker"]} and f"Worker {out['worker']} on " in out["logs"][0]
    assert len({e.job_id for e in events}) == 1 and events[0].job_id
    assert "Mode: HIGH QUALITY (base steps=7, guidance=8)" in "\n".join(out["logs"])
    assert result.image.size == (256, 256) and Path(result.path).is_file()
    assert parse_parameters(read_parameters(result.path))["Seed"] == "5"
    assert result.report.source == "pipeline"


def test_status_lists_each_replica_with_its_own_report(pool):
    from sdxl_ui.ui.render import status_html

    status = pool.status()
    assert status["state"] is ServiceState.LOADED and status["model"] == "tiny"
    replicas = status["replicas"]
    assert len(replicas) == 2 and len({r["pid"] for r in replicas}) == 2
    for r in replicas:
        assert r["node"] and r["device"] == "cpu" and r["model"] == "tiny" and r["state"] in ("idle", "busy")
        assert r["source"] == "pipeline" and any(row["name"] == "device" for row in r["rows"])
    page = status_html(status)
    assert "Workers (2)" in page and all(str(r["pid"]) in page for r in replicas)


def test_two_jobs_overlap_in_time_on_two_replicas(pool):
    outs = {}

    def job(i):
        outs[i] = collect(pool, GenerationRequest(prompt=f"overlap {i}", steps=40, seed=i))

    threads = [threading.Thread(target=job, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(not outs[i]["errors"] and len(outs[i]["results"]) == 1 for i in (1, 2)), outs
    assert outs[1]["worker"] != outs[2]["worker"]
    spans = [(min(t for t, k in outs[i]["t"] if k == "ProgressEvent"),
              max(t for t, k in outs[i]["t"] if k == "ProgressEvent")) for i in (1, 2)]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the two jobs did not run at the same time: {spans}"


def test_api_runs_on_the_ray_backend(pool, tmp_path):
    import asyncio

    from sdxl_ui import ImageService

    api = ImageService(backend=pool)
    assert asyncio.run(api.generate_image("a red fox", tmp_path / "fox.png", num_inference_steps=3, seed=9))
    assert parse_parameters(read_parameters(tmp_path / "fox.png"))["Seed"] == "9"


def test_cli_sends_a_job_to_the_running_workers(pool, tmp_path, capsys):
    import json

    from sdxl_ui import cli

    out = tmp_path / "cli.png"
    code = cli.main(["generate", "--ray-address", "auto", "--prompt", "from the cli", "--seed", "11", "--steps", "2",
                     "--out", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["seed"] == 11 and data["path"] == str(out)
    assert parse_parameters(read_parameters(out))["Model"] == "tiny"
    assert ray.is_initialized()  # attached to this process's Ray: left as it was


def test_8_clients_2_jobs_each_through_the_page_none_lost_none_mixed(pool, monkeypatch):
    from gradio_client import Client

    from sdxl_ui.ui import UIConfig, build_ui

    ran_on = {}  # seed → the replica that ran it, from the events the page received
    generate = pool.generate

    def recording(request, *args, **kwargs):
        for event in generate(request, *args, **kwargs):
            if isinstance(event, ResultEvent):
                ran_on[event.seed] = event.replica
            yield event

    monkeypatch.setattr(pool, "generate", recording)
    demo = build_ui(pool, UIConfig(queue_size=32))
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    args = dict(negative_text="", quality_label="High quality", cfg=8.0, n_images=1,
                size_label="Native (256×256)", w=256, h=256, sched="auto")
    outcomes, errors = {}, []
    try:
        def client_run(i):
            try:
                client = Client(demo.local_url, verbose=False)
                mine = []
                for j in range(2):
                    seed = 1000 * i + j
                    result = client.predict(prompt_text=f"client {i} job {j}", seed_value=seed, n_steps=3,
                                            api_name="/generate", **args)
                    mine.append((seed, result))
                outcomes[i] = mine
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"client {i}: {exc!r}")

        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        demo.close()
    assert not errors, errors
    done, paths = 0, set()
    for i, mine in outcomes.items():
        for seed, result in mine:
            log, _, image, used_seed, gallery = result[:5]
            assert used_seed == seed and f"client {i} job" in log and "🖥 Worker " in log, (i, seed, log[-2000:])
            assert f"🖥 Worker {ran_on[seed]} on " in log  # the page's log names the replica that ran it
            assert parse_parameters(read_parameters(image))["Seed"] == str(seed)
            paths.add(image)
            done += 1
        gallery_paths = [item["image"] if isinstance(item["image"], str) else item["image"]["path"]
                         for item in mine[-1][1][4]]
        seeds = sorted(int(parse_parameters(read_parameters(p))["Seed"]) for p in gallery_paths)
        assert seeds == [1000 * i, 1000 * i + 1], "a client saw another client's images"
    RELIABILITY["jobs"] += done
    RELIABILITY["lost"] += 16 - done
    assert done == 16 and len(paths) == 16
    workers = set(ran_on.values())
    assert len(workers) == 2, f"the page used only {workers}"


def test_stop_cancels_the_streaming_response_and_the_replica_stops_within_a_step(pool):
    cancel = CancelToken()
    out = {"progress": [], "events": []}

    def consume():
        for event in pool.generate(GenerationRequest(prompt="long", steps=150, seed=1, images=4), cancel=cancel):
            out["events"].append(event)
            if isinstance(event, ProgressEvent):
                out["progress"].append(event)
                if event.step == 3:
                    cancel.cancel()
                    out["stopped_at"] = time.time()

    consume()
    errors = [e for e in out["events"] if isinstance(e, ErrorEvent)]
    assert len(errors) == 1 and errors[0].kind is ErrorKind.CANCELLED, out["events"][-3:]
    assert errors[0].message.startswith("cancelled at step ") and errors[0].message.endswith("/420")
    assert not any(isinstance(e, ResultEvent) for e in out["events"])
    # The replica let go of its job within a step or two (a tiny step is well under a second): both idle again.
    ready(pool, 2, timeout=20)
    assert time.time() - out["stopped_at"] < 20
    RELIABILITY["faults"].add("Stop on a Ray replica")


def _complete_pngs(folder: Path) -> set:
    return {p for p in folder.rglob("*.png") if not p.name.startswith(".")}


def test_a_replica_killed_mid_job_gives_a_clear_error_and_is_replaced(pool):
    outputs = pool.settings.outputs
    before = _complete_pngs(outputs)
    state = {}

    def kill_when_running(event):
        if event.replica and "pid" not in state:  # the replica running the job, and its pid from the status
            state["pid"] = next(r["pid"] for r in pool.replicas() if r["replica"] == event.replica)
        if isinstance(event, ProgressEvent) and event.step == 3 and "killed" not in state:
            os.kill(state["pid"], signal.SIGKILL)  # the replica's own process, by its own pid
            state["killed"] = time.time()

    events = []
    for event in pool.generate(GenerationRequest(prompt="doomed", steps=150, seed=3, images=2)):
        events.append(event)
        kill_when_running(event)
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert "killed" in state and len(errors) == 1, events[-3:]
    assert errors[0].kind is ErrorKind.RUNTIME and re.search(r"stopped at step \d+/210", errors[0].message), errors
    assert "Ray restarts the worker; try again" in errors[0].message
    assert _complete_pngs(outputs) == before  # nothing half-written, nothing new
    # Ray starts a replacement (a new process); the next job succeeds.
    replicas = ready(pool, 2)
    assert state["pid"] not in {r["pid"] for r in replicas}
    out = collect(pool, GenerationRequest(prompt="after", steps=2, seed=4))
    assert not out["errors"] and out["results"][0].seed == 4
    RELIABILITY["faults"].add("Ray replica killed mid-job")


def test_a_replica_that_cannot_load_is_reported_gets_no_jobs_and_its_app_stops_only_itself(pool, tmp_path):
    # A second app in the same Ray instance, whose model folder is not an SDXL model: each replica reports why
    # and fails to start, so no job is ever sent to it; removing it leaves Ray and the first app running.
    broken_model = tmp_path / "not-a-model"
    broken_model.mkdir()
    broken = RayBackend(AppSettings(model=str(broken_model), outputs=tmp_path, device="cpu"), workers=1,
                        cpus_per_worker=0.01, app_name="broken")
    broken.start()
    try:
        end = time.time() + 120
        while time.time() < end and broken.status()["state"] is not ServiceState.ERROR:
            time.sleep(0.5)
        status = broken.status()
        assert status["state"] is ServiceState.ERROR, status
        assert "could not load the model" in status["message"] and str(broken_model.name) in status["message"]
        assert all(r["state"] == "error" for r in status["replicas"])
        events = list(broken.generate(GenerationRequest(prompt="x", steps=2)))
        assert isinstance(events[-1], ErrorEvent) and events[-1].kind is ErrorKind.MODEL
        assert "No worker could load the model" in events[-1].message
    finally:
        broken.shutdown(30)
    assert ray.is_initialized()  # not started by `broken`: still running
    out = collect(pool, GenerationRequest(prompt="still here", steps=2, seed=6))
    assert not out["errors"] and out["results"][0].seed == 6
    RELIABILITY["faults"].add("Ray replica cannot load its model")


def test_app_flags_for_workers(caplog):
    import app

    assert app.main(["--workers", "-1", "--model", "tiny"]) == 2
    assert app.main(["--workers", "2", "--worker-cpus", "0", "--model", "tiny"]) == 2
    assert "error: workers: must be 1 or more (got -1)" in caplog.text
    assert "error: worker_cpus: must be more than 0 (got 0.0)" in caplog.text
