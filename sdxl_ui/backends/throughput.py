"""Jobs per minute through the generation seam: the in-process service, then the Ray backend with 1 and 2 replicas.

    python -m sdxl_ui.backends.throughput --model demo --jobs 16 --clients 4 --steps 20

Each Ray configuration runs in its own fresh local Ray instance (no dashboard, 100 MB object store), waits until
every replica has loaded the model, runs one warm-up job per replica, then times ``--jobs`` jobs submitted by
``--clients`` threads at once (each job: one image, ``--steps`` requested steps, its own seed). The machine's
load average before and after is printed, since other work on the machine changes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

from ..schema import ErrorEvent, GenerationRequest, Quality, ResultEvent
from ..settings import AppSettings


def _run_jobs(backend, jobs: int, clients: int, steps: int, quality: Quality, outputs) -> dict:
    lock = threading.Lock()
    queue = list(range(jobs))
    done, failed, workers = [], [], {}

    def client():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            request = GenerationRequest(prompt="a large red circle on a blue background", steps=steps, seed=i,
                                        quality=quality)
            worker = ""
            for event in backend.generate(request):
                match event:
                    case ResultEvent():
                        done.append(i)
                    case ErrorEvent():
                        failed.append((i, event.message))
                if event.replica and event.replica != worker:  # the Ray replica that runs this job
                    worker = event.replica
                    with lock:
                        workers[worker] = workers.get(worker, 0) + 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"jobs": jobs, "done": len(done), "failed": len(failed), "wall_s": round(wall, 1),
            "jobs_per_min": round(len(done) / wall * 60, 1), "jobs_per_worker": sorted(workers.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_ui.backends.throughput")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="requested steps per job (CPU runs × 0.7)")
    parser.add_argument("--quality", default="fast", choices=["high", "fast"])
    parser.add_argument("--configs", default="local,1x2,2x1",
                        help="comma list: local (in-process service), RxC (R Ray replicas of C CPUs each)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    quality = Quality(args.quality)
    rows = []
    for config in args.configs.split(","):
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="sdxlthr") as temp:
            settings = AppSettings(model=args.model, outputs=os.path.join(temp, "out"), device="cpu")
            if config == "local":
                from ..service import GenerationService

                backend = GenerationService(settings)
                backend.ensure_loaded()
                label, shutdown = "in-process service (no Ray)", None
                warm = 1
            else:
                from .ray_serve import RayBackend

                replicas, cpus = config.split("x")
                replicas, cpus = int(replicas), float(cpus)
                backend = RayBackend(settings, workers=replicas, cpus_per_worker=cpus, ray_init=dict(
                    num_cpus=max(os.cpu_count() or 1, int(replicas * cpus)),
                    object_store_memory=100 * 1024 * 1024, _temp_dir=os.path.join(temp, "ray")))
                backend.start()
                end = time.time() + 600
                while sum(r.get("state") == "idle" for r in backend.replicas()) < replicas:
                    if time.time() > end:
                        raise SystemExit(f"{config}: replicas not ready: {backend.replicas()}")
                    time.sleep(0.5)
                label, shutdown = f"Ray Serve, {replicas} replica(s) × {cpus:g} CPU", backend.shutdown
                warm = replicas
            _run_jobs(backend, warm, warm, args.steps, quality, temp)  # warm-up: one job per worker
            row = _run_jobs(backend, args.jobs, args.clients, args.steps, quality, temp)
            if shutdown:
                shutdown(60)
        row.update(config=config, label=label, load_before=round(load_before, 2),
                   load_after=round(os.getloadavg()[0], 2))
        rows.append(row)
        if not args.json:
            print(f"{label:42s} {row['done']:3d}/{row['jobs']} jobs in {row['wall_s']:6.1f} s = "
                  f"{row['jobs_per_min']:6.1f} jobs/min  (per worker {row['jobs_per_worker']}; "
                  f"load avg {row['load_before']} → {row['load_after']})", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
