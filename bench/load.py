"""Cold start: how fast a full-size transformer comes off the disk, through the loaders, against the disk.

Writes the full-size Z-Image-Turbo transformer once (the real architecture, 6.15B parameters of random
bf16 weights, 12.3 GB in the Hugging Face layout: ``config.json`` and safetensors shards) into ``--dir``,
then, in one run and each in a fresh process with the files evicted from the page cache first
(``posix_fadvise(DONTNEED)``), times:

- ``disk``: a plain sequential read of the shard files in 16 MiB blocks, what ``dd`` does; it runs first
  and again last (a virtual disk's host cache may warm up on the first pass);
- ``dd-direct``: ``dd iflag=direct``, which reads past the page cache altogether;
- ``disk-parallel``: 8 threads reading 64 MiB pieces at once (some disks answer several requests faster);
- ``from_pretrained``: ``ZImageTransformer2DModel.from_pretrained`` as the serving loader calls it;
- ``from_pretrained-parallel``: the same with diffusers' ``HF_ENABLE_PARALLEL_LOADING=yes``;
- ``prefetch+from_pretrained``: the same while a thread reads the shards front to back
  (``serve_app.engines.weights_io.prefetch``, what the serving loader does);
- ``safetensors``: ``safetensors.torch.load_file`` shard by shard (the tensors alone, no module);
- ``safetensors-threads``: the same, one thread per shard;
- ``safetensors-read``: each shard read whole into memory, then ``safetensors.torch.load``.

The loaders map the files and read a page only when a tensor touches it, so each loader is followed by a
touch of every 4 KiB page of every tensor, which is what the copy to a GPU does; ``read from storage``
(``/proc/self/io``) shows that every byte came off the disk. The fastest plain read is the bound each is
held to. ``--smoke`` does the same with the tiny architecture (what the test suite runs); its figures mean
nothing.

    .venv/bin/python -m bench.load --dir /var/tmp/imageserve-load [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("disk", "dd-direct", "disk-parallel", "from_pretrained", "from_pretrained-parallel",
           "prefetch+from_pretrained", "safetensors", "safetensors-threads", "safetensors-read", "disk-again")
BLOCK = 16 << 20


def write_transformer(folder: Path, size: str) -> None:
    """The Z-Image transformer of ``size`` with random bf16 weights, saved as the Hub lays it out."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from serve_app.engines.random_weights import Z_IMAGE_DIMS

    with torch.device("meta"):
        model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, norm_eps=1e-5,
                                         qk_norm=True, rope_theta=256.0, t_scale=1000.0,
                                         **Z_IMAGE_DIMS[size]["transformer"])
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02, generator=generator)
    model.save_pretrained(folder, max_shard_size="5GB", safe_serialization=True)
    for shard in shards(folder):
        with open(shard, "rb+") as handle:
            os.fsync(handle.fileno())


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folder: Path) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for path in shards(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_ONE = r'''
import os, sys, time, json
from pathlib import Path
folder, method = Path(sys.argv[1]), sys.argv[2]
files = sorted(folder.glob("*.safetensors"))


def read_sequentially(paths, block=16 << 20):
    buffer = bytearray(block)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def touch(tensors):
    # One element of every 4 KiB page: each page must come off the disk, as the copy to a GPU makes it.
    import torch
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        flat[:: max(1, 4096 // flat.element_size())].float().sum()


if method in ("from_pretrained", "from_pretrained-parallel", "prefetch+from_pretrained") or \
        method.startswith("safetensors"):
    import torch  # the imports are not the load
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import load, load_file
started = time.perf_counter()
if method == "disk-parallel":
    from concurrent.futures import ThreadPoolExecutor
    piece = 64 << 20
    def read_piece(task):
        path, offset = task
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            buffer = bytearray(piece)
            handle.readinto(buffer)
    tasks = [(p, o) for p in files for o in range(0, p.stat().st_size, piece)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(read_piece, tasks))
elif method.startswith("disk"):
    read_sequentially(files)
elif method in ("from_pretrained", "from_pretrained-parallel"):
    model = ZImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    touch(model.state_dict().values())
elif method == "prefetch+from_pretrained":
    from serve_app.engines.weights_io import prefetch
    with prefetch(files):
        model = ZImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        touch(model.state_dict().values())
elif method == "safetensors":
    for path in files:
        touch(load_file(path).values())
elif method == "safetensors-read":
    for path in files:
        touch(load(path.read_bytes()).values())
else:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        for tensors in pool.map(load_file, files):
            touch(tensors.values())
seconds = time.perf_counter() - started
# What this process made the kernel fetch from storage: a loader that left pages unread would show it.
read_bytes = int(next(l for l in open("/proc/self/io") if l.startswith("read_bytes:")).split()[1])
print(json.dumps({"seconds": seconds, "read_bytes": read_bytes}))
'''


def time_method(folder: Path, method: str) -> tuple[float, int | None]:
    """Seconds to read or load every shard, and the bytes the kernel fetched from storage meanwhile."""
    evict(folder)
    if method == "dd-direct":
        started = time.perf_counter()
        for shard in shards(folder):
            subprocess.run(["dd", f"if={shard}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True,
                           capture_output=True)
        return time.perf_counter() - started, None
    env = dict(os.environ)
    if method == "from_pretrained-parallel":
        env["HF_ENABLE_PARALLEL_LOADING"] = "yes"
    out = subprocess.run([sys.executable, "-c", _ONE, str(folder), method], capture_output=True, text=True,
                         cwd=ROOT, check=True, env=env).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    return measured["seconds"], measured["read_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/var/tmp/imageserve-load", help="where the transformer is written")
    parser.add_argument("--smoke", action="store_true", help="the tiny architecture (the test suite's run)")
    parser.add_argument("--repeat", type=int, default=1, help="passes over every method; each reports its median")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = "tiny" if args.smoke else "full"
    folder = Path(args.dir) / f"z-image-transformer-{size}"
    if not shards(folder):
        started = time.perf_counter()
        write_transformer(folder, size)
        print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    total = sum(path.stat().st_size for path in shards(folder))
    runs = [{method: time_method(folder, method) for method in METHODS} for _ in range(args.repeat)]
    # Per method, the run with the median time: a shared disk's rate drifts between passes.
    measured = {m: sorted((run[m] for run in runs), key=lambda r: r[0])[len(runs) // 2] for m in METHODS}
    seconds = {method: s for method, (s, _) in measured.items()}
    # The strongest of the plain reads is the bound every loader is held to.
    disk_rate = total / min(seconds[m] for m in METHODS if m.startswith(("disk", "dd")))
    report = {"bytes": total, "shards": len(shards(folder)), "size": size,
              "methods": {m: {"seconds": s, "gb_per_s": total / s / 1e9, "of_disk": total / s / disk_rate,
                              "read_from_storage": None if r is None else r / total}
                          for m, (s, r) in measured.items()}}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{total / 1e9:.2f} GB in {report['shards']} shards ({size}), median of {args.repeat} passes")
    for method, row in report["methods"].items():
        fetched = "" if row["read_from_storage"] is None else f"  {row['read_from_storage']:5.2f} read from storage"
        print(f"  {method:<26} {row['seconds']:7.2f} s  {row['gb_per_s']:6.2f} GB/s  {row['of_disk']:5.2f} of the "
              f"best plain read{fetched}")


if __name__ == "__main__":
    main()
