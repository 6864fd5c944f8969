"""The benchmarks still run (their figures live in docs/benchmarks.md, not in assertions)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_placement_benchmark_runs_and_reports_both_policies():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "placement.py"), "--requests", "300", "--rates", "0.5",
                          "--json"], capture_output=True, text=True, check=True, timeout=120).stdout
    load = json.loads(out)["loads"]["0.5/s"]
    assert {"router", "round_robin", "ratio_round_robin_over_router"} <= set(load)
    assert load["router"]["mean_s"] > 0 and load["round_robin"]["p95_s"] > 0
