"""Cold start and memory of the embedded default (tiny models, CPU), measured in one run.

Time from nothing to the first answered request, and what it is spent on: Python imports, starting
the private Ray, Serve bringing up the replicas (of which: pipeline load and warm-up, as each replica
reports them); then resident memory per replica and per Ray system process.

    .venv/bin/python -m bench.cold_start [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

MB = 1024 * 1024


def import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import torch, diffusers, transformers, ray.serve; " \
           "print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def ray_process_rss_mb(session_dir: str) -> dict[str, float]:
    """Resident memory of this run's Ray processes: our children, and those naming our private RAY_TMPDIR."""
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    totals: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.pid not in ours and not any(session_dir in part for part in cmdline):
                continue
            name = os.path.basename(cmdline[0]) if cmdline else proc.info["name"]
            if "python" in name:
                title = proc.name()
                name = title if title.startswith("ray::") else "python (Ray worker/agent)"
            totals[name] = totals.get(name, 0.0) + proc.memory_info().rss / MB
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return {k: round(v, 1) for k, v in sorted(totals.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import httpx

    from serve_app.embedded import embedded_config
    from serve_app.runner import LocalService, free_port

    imports = import_seconds()
    config = embedded_config(Path(tempfile.mkdtemp(prefix="imageserve-cold-")))
    service = LocalService(config, port=free_port(), log_to_driver=False)
    marks = {}
    started = time.perf_counter()
    service.start(after_ray_init=lambda: marks.setdefault("ray_s", time.perf_counter() - started))
    try:
        marks["deployed_s"] = time.perf_counter() - started
        response = httpx.post(f"{service.url}/v1/images/generations", timeout=120,
                              json={"prompt": "first", "size": "64x64", "num_inference_steps": 2})
        response.raise_for_status()
        marks["first_answer_s"] = time.perf_counter() - started
        from ray import serve

        replicas = {}
        for name in ("gen-z-image-turbo", "edit-qwen-image-edit-2509", "edit-qwen-image-edit-2511"):
            info = serve.get_deployment_handle(name, config.serving.app_name).info.remote().result()
            replicas[name] = {"load_s": round(info["load_seconds"], 2), "warmup_s": round(info["warmup_seconds"], 2),
                              "rss_mb": round(info["host_rss_bytes"] / MB, 1)}
        system = ray_process_rss_mb(service.tmpdir)
    finally:
        service.stop()
    report = {
        "python_imports_s": round(imports, 2),
        "ray_start_s": round(marks["ray_s"], 2),
        "serve_deploy_s": round(marks["deployed_s"] - marks["ray_s"], 2),
        "first_request_s": round(marks["first_answer_s"] - marks["deployed_s"], 2),
        "total_to_first_answer_s": round(marks["first_answer_s"], 2),
        "replicas": replicas,
        "process_rss_mb": system,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"imports (torch, diffusers, transformers, ray.serve) in a fresh process: {report['python_imports_s']} s")
    print(f"start private Ray: {report['ray_start_s']} s; Serve up (replicas loaded and warm): "
          f"{report['serve_deploy_s']} s; first request: {report['first_request_s']} s; "
          f"total to first answer: {report['total_to_first_answer_s']} s")
    for name, row in replicas.items():
        print(f"  {name:<28} load {row['load_s']:>5} s  warm-up {row['warmup_s']:>5} s  RSS {row['rss_mb']:>7} MB")
    print("resident memory by process (MB):")
    for name, mb in system.items():
        print(f"  {name:<60} {mb:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
