"""`python -m sdxl_ui selftest`: on CPU it runs every CPU configuration; which ones run follows the probe."""
import json

import pytest
from tests.helpers import load_probe

from sdxl_ui.cli import main
from sdxl_ui.selftest import CONFIGURATIONS, applicable

CPU_KEYS = {"bf16", "fp32", "sliced", "refiner", "vae-tiling", "fast", "int8", "compile", "stop"}


def selftest(capsys, *args):
    code = main(["selftest", "--device", "cpu", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_selftest_on_cpu_passes_every_cpu_configuration(capsys):
    # torch.compile's first call compiles for minutes on a 2-core CPU: the suite leaves that one configuration out
    # (`python -m sdxl_ui selftest --device cpu` runs it; README).
    code, out = selftest(capsys, "--skip", "compile")
    rows = {row["key"]: row for row in out["configurations"]}
    failed = {k: r["problems"] for k, r in rows.items() if r["result"] == "fail"}
    assert code == 0 and out["ok"] and not failed, failed
    assert out["device"] == "cpu" and "cores" in out["device_name"] and out["arch"] == "tiny"
    assert {k for k, r in rows.items() if r["result"] == "pass"} == CPU_KEYS - {"compile"}
    assert rows["compile"]["result"] == "skipped" and out["skipped"] == 1
    assert {k for k, r in rows.items() if r["result"] == "n/a"} == {c.key for c in CONFIGURATIONS} - CPU_KEYS
    assert "CUDA only" in rows["offload-model"]["note"]
    for key in CPU_KEYS - {"compile"}:  # each measured: time, peak memory, memory before and after the run
        row = rows[key]
        assert row["seconds"] > 0 and row["peak_memory_gb"] > 0
        assert row["memory_after_gb"] is not None and row["memory_before_gb"] is not None
    assert "VAE tiles" in rows["vae-tiling"]["note"]
    assert "attention sliced" in rows["sliced"]["note"] and "refiner" in rows["refiner"]["note"]
    assert "int8" in rows["int8"]["note"] or "int8" in rows["int8"]["configuration"]


def test_selftest_fails_and_says_why_when_a_configuration_is_broken(capsys, monkeypatch):
    """A selftest that cannot fail proves nothing: NaN latents must fail the run with the reason, exit 1."""
    import sdxl_ui.run as service  # the run decodes

    real = service.decode_latents
    monkeypatch.setattr(service, "decode_latents", lambda pipe, latents: real(pipe, latents * float("nan")))
    code, out = selftest(capsys, "--only", "bf16")
    assert code == 1 and not out["ok"] and out["failed"] == 1
    problems = " ".join(out["configurations"][0]["problems"])
    assert "latents entering the VAE decoder" in problems and "image is constant" in problems


def test_selftest_bad_input_names_the_field(capsys, monkeypatch):
    code, out = selftest(capsys, "--only", "warp-drive")
    assert code == 2 and out["error"].startswith("only: 'warp-drive'")
    import sdxl_ui.device

    monkeypatch.setattr(sdxl_ui.device, "probe_hardware", lambda: load_probe("cpu_avx2_no_bf16"))
    code = main(["selftest", "--device", "cuda", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and out["error"].startswith("device: 'cuda' was requested")


@pytest.mark.parametrize("probe,device,runs,not_here", [
    ("cpu_avx2_no_bf16", "cpu", CPU_KEYS, {"fp16": "not offered on CPU", "xformers": "CUDA-only"}),
    ("rtx4090_24gb", "cuda", {"fp16", "bf16", "sliced", "refiner", "offload-model", "offload-sequential",
                              "vae-tiling", "xformers", "fast", "compile", "stop"},
     {"fp32": "GPUs use fp16", "int8": "CPU only"}),
    ("h100_80gb", "cuda", {"fp16", "bf16", "sliced", "refiner", "offload-model", "offload-sequential",
                           "vae-tiling", "fast", "compile", "stop"}, {"xformers": "kernel did not run"}),
    ("apple_m2_pro", "mps", {"fp16", "refiner", "vae-tiling", "fast", "compile", "stop"},
     {"sliced": "InvokeAI #7049", "offload-model": "CUDA only"}),
])
def test_which_configurations_run_follows_the_probe(probe, device, runs, not_here):
    probe = load_probe(probe)
    verdicts = {c.key: applicable(c, probe, device) for c in CONFIGURATIONS}
    assert {k for k, (ok, _) in verdicts.items() if ok} == runs
    for key, needle in not_here.items():
        assert needle in verdicts[key][1]
