"""Reading weights ahead of the loader: which files, all their bytes, and a failed load stops it."""

from __future__ import annotations

import threading

import pytest

from serve_app.engines import weights_io


def test_weight_files_are_the_components_safetensors_less_the_skipped(tiny_models):
    folder = tiny_models["z-image-turbo"]
    files = weights_io.weight_files(folder)
    assert files and all(f.suffix == ".safetensors" for f in files)
    assert {f.parent.name for f in files} == {"transformer", "text_encoder", "vae"}
    assert "transformer" not in {f.parent.name for f in weights_io.weight_files(folder, skip=("transformer",))}


def test_read_through_reads_every_byte(tiny_models):
    files = weights_io.weight_files(tiny_models["z-image-turbo"])
    assert weights_io.read_through(files) == sum(f.stat().st_size for f in files)


def test_prefetch_runs_beside_the_block_and_is_done_when_it_ends(tiny_models, monkeypatch):
    files = weights_io.weight_files(tiny_models["z-image-turbo"])
    read: list[int] = []
    seen_thread: list[str] = []
    real = weights_io.read_through

    def recorded(paths, stop=None):
        seen_thread.append(threading.current_thread().name)
        read.append(real(paths, stop))
        return read[-1]

    monkeypatch.setattr(weights_io, "read_through", recorded)
    with weights_io.prefetch(files):
        pass
    assert seen_thread == ["imageserve-prefetch"] and read == [sum(f.stat().st_size for f in files)]


def test_a_failed_load_stops_the_prefetch_and_raises(tmp_path):
    big = tmp_path / "component" / "model.safetensors"
    big.parent.mkdir()
    big.write_bytes(b"\0" * (3 * weights_io.BLOCK_BYTES))
    with pytest.raises(RuntimeError, match="load failed"), weights_io.prefetch([big]):
        raise RuntimeError("load failed")
    assert not any(t.name == "imageserve-prefetch" for t in threading.enumerate())


def test_a_missing_file_does_not_fail_the_prefetch(tmp_path):
    with weights_io.prefetch([tmp_path / "gone.safetensors"]):
        pass
