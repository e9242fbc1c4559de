"""Issue 20: the job contract every backend shares (sdxl_ui.jobs: CancelToken, Backend, Admission), the ids the
events carry, and the one line that says what to set when a Ray cluster wants a token (sdxl_ui.backends.ray_auth).
None of these need torch or Ray."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from tests.helpers import ROOT

from sdxl_ui.backends.ray_auth import auth_message, refused_for_auth, token_source
from sdxl_ui.jobs import Admission, CancelToken, Capabilities, collect, new_job_id
from sdxl_ui.schema import ErrorEvent, ErrorKind, Event, LogEvent, LogLevel, ProgressEvent, ResultEvent, ServiceState


def test_the_contract_is_one_object_wherever_it_is_imported_from():
    import sdxl_ui.backends as backends
    import sdxl_ui.jobs as jobs

    assert backends.CancelToken is jobs.CancelToken and backends.Backend is jobs.Backend
    assert backends.Admission is jobs.Admission


def test_importing_the_contract_and_the_seam_imports_neither_torch_nor_ray_nor_gradio():
    code = ("import sys, sdxl_ui.jobs, sdxl_ui.backends, sdxl_ui.backends.ray_auth\n"
            "print(sorted(m for m in ('torch', 'ray', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_admission_lets_jobs_in_until_close_then_cancels_and_waits_for_them():
    admission = Admission()
    token, finished = CancelToken(), threading.Event()
    started = []
    assert admission.admit(token, finished, start=lambda: started.append(1)) and started == [1]
    assert admission.running() == 1

    def job():  # a running job: it ends once cancelled, as a generation stops at its next step
        token.wait(10)
        admission.done(token)
        finished.set()

    threading.Thread(target=job, daemon=True).start()
    assert admission.close(10) is True
    assert token.cancelled and finished.is_set() and admission.running() == 0 and admission.closing
    late = CancelToken()
    assert admission.admit(late, threading.Event(), start=lambda: started.append(2)) is False
    assert started == [1] and not late.cancelled


def test_admission_close_waits_for_threads_and_says_when_one_did_not_end():
    admission = Admission()
    token, release = CancelToken(), threading.Event()
    thread = threading.Thread(target=release.wait, args=(10,), daemon=True)  # ignores its token
    assert admission.admit(token, thread, start=thread.start)
    assert admission.close(0.2) is False and token.cancelled  # still running after the timeout
    release.set()
    thread.join(5)
    assert Admission().close(0.0) is True  # nothing running: clean


def test_events_carry_their_ids_with_defaults_for_every_existing_constructor():
    assert LogEvent("x").job_id == "" and LogEvent("x").replica == ""
    assert ErrorEvent("x", "runtime").job_id == ""
    event = ProgressEvent(1, 2, 0.1, 0.1, 0.1, "", None, job_id="abc", replica="r1")
    assert (event.job_id, event.replica) == ("abc", "r1")
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100 and all(ids)


def test_kinds_levels_and_states_are_enums_whose_values_are_the_old_strings():
    """Nothing changes on the wire: JSON, f-strings and == read the old strings; code compares members."""
    import json
    import pickle

    error, line = ErrorEvent("x", "busy"), LogEvent("y", "warning")
    assert error.kind is ErrorKind.BUSY and line.level is LogLevel.WARNING and LogEvent("z").level is LogLevel.INFO
    assert pickle.loads(pickle.dumps(error)).kind is ErrorKind.BUSY  # as a Ray worker sends it
    assert json.dumps({"kind": error.kind, "state": ServiceState.LOADING}, ensure_ascii=False) == \
        '{"kind": "busy", "state": "loading…"}'
    assert f"{error.kind}/{ServiceState.NOT_LOADED}" == "busy/not loaded" and error.kind == "busy"
    assert ServiceState.LOADING.label == "loading…" and ServiceState("error") is ServiceState.ERROR
    assert [k.value for k in ErrorKind] == ["validation", "model", "memory", "cancelled", "runtime", "busy",
                                             "settings", "device"]
    with pytest.raises(ValueError):
        ErrorEvent("x", "no such kind")


def test_collect_gathers_a_job_s_events_by_type_in_order():
    progress = [ProgressEvent(i, 2, 0.1, 0.1, 0.1) for i in (1, 2)]
    first, last = ErrorEvent("a", "runtime"), ErrorEvent("b", "cancelled")
    seen = []
    got = collect([LogEvent("hi"), *progress, first, last], each=seen.append)
    assert got.logs == [LogEvent("hi")] and got.progress is progress[-1] and got.last_step == 2
    assert got.errors == [first, last] and got.error is last and got.results == [] and len(seen) == 5
    assert collect([]).error is None and collect([]).last_step == 0
    assert set(Event.__args__) == {LogEvent, ProgressEvent, ResultEvent, ErrorEvent}


def test_capabilities_default_to_a_backend_with_nothing_beyond_the_protocol():
    caps = Capabilities()
    assert not (caps.quality_defaults or caps.loras or caps.start) and caps.local_files
    with pytest.raises(AttributeError):
        caps.start = True  # frozen: a backend declares them once


def test_token_auth_message_names_what_to_set_and_where_the_token_lives(monkeypatch, tmp_path):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    assert token_source() is None
    message = auth_message("10.0.0.5:6379")
    assert "\n" not in message and "RAY_AUTH_MODE=token" in message and "10.0.0.5:6379" in message
    assert "copy the head node's ~/.ray/auth_token" in message
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert token_source() == "~/.ray/auth_token" and "token is in ~/.ray/auth_token" in auth_message("h:1")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/srv/ray/token")
    assert "/srv/ray/token" in auth_message("h:1")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set, yet refused: the token is not the cluster's
    assert "refused this app's token (/srv/ray/token" in auth_message("h:1")


def test_a_refused_token_is_told_from_other_connection_errors():
    try:
        try:
            raise RuntimeError("Failed to connect to GCS. ray.exceptions.AuthenticationError: RPC error: "
                               "InvalidAuthToken: Authentication token is missing or incorrect.")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6390") from cause
    except ConnectionError as exc:
        assert refused_for_auth(exc)
    assert not refused_for_auth(ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6390"))
