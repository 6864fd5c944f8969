"""What a junk request costs the router: response bytes, seconds and memory, per kind of junk.

The router's HTTP app (``create_api``) runs in this process under Starlette's test client; nothing
reaches a model (the service behind it is never called for these). Each junk body runs in a fresh
subprocess so that its peak RSS is its own. Junk kinds:

- ``unknown-keys``: a JSON generation body of ~5.5 MB with 400,000 unknown keys;
- ``long-key``: a JSON body with one 5 MB key;
- ``streamed``: the unknown-keys body sent chunked, with no Content-Length;
- ``keys-60kb``: as many unknown keys as fit in 60 KB (under the JSON route's limit, so it is parsed).

    .venv/bin/python -m bench.amplification [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = ("unknown-keys", "long-key", "streamed", "keys-60kb")

_ONE = r'''
import json, resource, sys, time
from fastapi.testclient import TestClient
from serve_app.openai_api.routes import create_api

class Unused:
    """A service that is never called: every junk body is refused before it."""
    def record_error(self, task, reason):
        pass

case = sys.argv[1]
if case == "long-key":
    body = json.dumps({"prompt": "a cat", "k" * 5_000_000: 1}).encode()
elif case == "keys-60kb":
    body = json.dumps({"prompt": "a cat", **{f"j{i}": 0 for i in range(5_400)}}).encode()
else:
    body = json.dumps({"prompt": "a cat", **{f"junk_{i}": i for i in range(400_000)}}).encode()
client = TestClient(create_api(Unused()))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if case == "streamed":
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    response = client.post("/v1/images/generations", content=chunks, headers={"content-type": "application/json"})
else:
    response = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"request_bytes": len(body), "status": response.status_code, "response_bytes": len(response.content),
                  "seconds": round(seconds, 3), "peak_rss_growth_mb": round((after - before) / 1024, 1)}))
'''


def measure(case: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _ONE, case], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {case: measure(case) for case in CASES}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'junk':<14} {'request MB':>10} {'status':>6} {'response KB':>12} {'seconds':>8} {'peak RSS +MB':>12}")
    for case, row in report.items():
        print(f"{case:<14} {row['request_bytes'] / 1e6:>10.2f} {row['status']:>6} {row['response_bytes'] / 1e3:>12.1f} "
              f"{row['seconds']:>8.3f} {row['peak_rss_growth_mb']:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
