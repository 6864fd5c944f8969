"""Host RAM a swap group's pinned weight copies take: tensor by tensor (PyTorch's caching host allocator) against
HostCopies' flat buffers, for the real models' components, built on the meta device (no weights, no GPU).

    python -m bench.pinned_host            # a table
    python -m bench.pinned_host --json     # one JSON object

PyTorch's caching host allocator rounds every pinned allocation up to a power of two
(ATen/core/CachingHostAllocator.h), so ``tensor.pin_memory()`` per weight takes the sum of the rounded sizes.
HostCopies packs a module's weights into one buffer at 256-byte offsets and page-locks it in place at its exact
size (serve_app/engines/host_copies.py). Both figures are computed from the tensors' sizes: they are what the
allocators take, which a GPU machine only confirms. The planner's host-RAM check for swap groups counts the
weights, which the flat layout matches to the alignment padding.
"""

from __future__ import annotations

import json

import torch

from bench.common import bench_parser, report_stream
from serve_app.engines.host_copies import flat_bytes, per_tensor_pinned_bytes
from serve_app.engines.random_weights import random_weight_pipeline

GIB = 2**30
VARIANTS = ("z-image-turbo", "qwen-image-edit-2511")


def measure(variant_id: str) -> list[dict]:
    pipe = random_weight_pipeline(variant_id, "full", "meta", torch.bfloat16)
    rows = []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        tensors = list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())
        weights = sum(t.numel() * t.element_size() for t in tensors)
        per_tensor, flat = per_tensor_pinned_bytes(tensors), flat_bytes([module])
        rows.append({"variant": variant_id, "component": name, "tensors": len(tensors), "weights_gib": weights / GIB,
                     "per_tensor_pinned_gib": per_tensor / GIB, "flat_gib": flat / GIB,
                     "per_tensor_factor": per_tensor / weights, "flat_factor": flat / weights})
    return rows


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    with report_stream(args.json) as out:
        rows = [row for variant in VARIANTS for row in measure(variant)]
        if args.json:
            print(json.dumps({"rows": rows}), file=out)
            return
        print(f"{'variant':22} {'component':13} {'tensors':>7} {'weights GiB':>11} {'per-tensor GiB':>14} "
              f"{'x':>5} {'flat GiB':>9} {'x':>7}", file=out)
        for r in rows:
            print(f"{r['variant']:22} {r['component']:13} {r['tensors']:7d} {r['weights_gib']:11.2f} "
                  f"{r['per_tensor_pinned_gib']:14.2f} {r['per_tensor_factor']:5.2f} {r['flat_gib']:9.2f} "
                  f"{r['flat_factor']:7.4f}", file=out)


if __name__ == "__main__":
    main()
