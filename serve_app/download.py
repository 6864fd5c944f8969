"""``imageserve download``: exactly the weight files a config's variants load, into the Hugging Face cache.

For each diffusers repository: ``model_index.json`` and the folders of the components it lists, without
``transformer/`` when every variant using the repository replaces it with a nunchaku 4-bit
transformer; for each such variant, its one nunchaku file; for each Lightning variant, its LoRA file.
Variants whose config ``source`` (or ``transformer_source``, ``lora_source``) is a local folder or file
need nothing.

Before fetching anything the sizes are read from the Hub and compared with the free disk; downloads
resume where an interrupted one stopped (huggingface_hub's ``.incomplete`` files and HTTP ranges);
every file is then checked against the Hub's hashes (sha256 for LFS files, the git blob id for the
rest). Serving afterwards runs offline (``hf.offline``, ``HF_HUB_OFFLINE=1``) from the same cache.

A repository pinned to a commit (``models.<id>.revision`` or the catalog's) is fetched at that commit and
loaded at it, whatever its main branch says by then; an unpinned one is fetched at main's current
commit, which the output names so it can be pinned.
``HF_ENDPOINT`` selects another Hub (a mirror, or the tests' local server).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.domain.config import AppConfig
from serve_app.engines.hardware import free_disk_gb
from serve_app.engines.loading import pipeline_folders

GB = 1e9
DEFAULT_KEEP_FREE_GB = 5.0  # a node that fills its disk to the last byte fails in worse ways than a refusal


class DownloadError(RuntimeError):
    """Nothing was (or no more will be) fetched: not enough disk, or a file that fails its check."""


@dataclass
class RepoNeed:
    """What one repository must provide: a whole pipeline (with or without its transformer) and/or files."""

    repo_id: str
    revision: str | None = None      # the pinned commit; None follows main
    variants: list[str] = field(default_factory=list)
    pipeline: bool = False           # model_index.json and its components' folders
    with_transformer: bool = False   # ... including transformer/ (some variant runs the bf16 one)
    files: set[str] = field(default_factory=set)  # single files (nunchaku transformers)


@dataclass
class RemoteFile:
    repo_id: str
    path: str
    size: int
    sha256: str | None   # LFS files
    blob_id: str | None  # the git blob id, for the rest


def needs(config: AppConfig) -> tuple[list[RepoNeed], dict[str, str]]:
    """The repositories the configured variants load from, and the variants that load from local paths."""
    catalog = config.build_catalog()
    repos: dict[tuple[str, str | None], RepoNeed] = {}
    local: dict[str, str] = {}
    for variant_id in config.models_to_load():
        variant = catalog.variant(variant_id)
        settings = config.models[variant_id]
        source = settings.source or variant.source.local_path or variant.source.hub_repo
        if source is None:
            raise DownloadError(f"{variant_id} names no source (config `source` or catalog `hub_repo`)")
        pipeline_pin, transformer_pin = config.weights(variant_id)
        if pipeline_pin.repo is None:
            local[variant_id] = source
        else:
            need = repos.setdefault((source, pipeline_pin.revision), RepoNeed(source, pipeline_pin.revision))
            need.variants.append(variant_id)
            need.pipeline = True
            need.with_transformer |= not variant.requires_nunchaku
        single_files = []
        if variant.requires_nunchaku:
            single_files.append(("4-bit transformer", settings.transformer_source, transformer_pin,
                                 variant.source.transformer_file))
        if variant.source.lora_file is not None:
            single_files.append(("LoRA", settings.lora_source, config.lora_weights(variant_id),
                                 variant.source.lora_file))
        for what, local_source, pin, file in single_files:
            if local_source:
                local[f"{variant_id} ({what})"] = local_source
            else:
                need = repos.setdefault((pin.repo, pin.revision), RepoNeed(pin.repo, pin.revision))
                need.variants.append(variant_id)
                need.files.add(file)
    for name, lora in config.loras.items():  # per-request LoRAs: one file each
        if lora.is_local:
            local[f"LoRA {name}"] = lora.source
        else:
            need = repos.setdefault((lora.source, lora.revision), RepoNeed(lora.source, lora.revision))
            need.variants.append(f"LoRA {name}")
            need.files.add(lora.file)
    return list(repos.values()), local


def remote_files(need: RepoNeed, endpoint: str | None, cache_dir: str | None) -> tuple[str, list[RemoteFile]]:
    """The commit ``need`` is fetched at (its pin, or main's current one) and the files it takes from it,
    with sizes and hashes."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi(endpoint=endpoint).model_info(need.repo_id, revision=need.revision, files_metadata=True)
    if need.revision is not None and info.sha != need.revision:
        raise DownloadError(f"{need.repo_id}: the Hub answered commit {info.sha} for the pinned {need.revision}")
    wanted = set(need.files)
    if need.pipeline:
        index = hf_hub_download(need.repo_id, "model_index.json", revision=info.sha, cache_dir=cache_dir,
                                endpoint=endpoint)
        folders = pipeline_folders(json.loads(Path(index).read_text()), need.with_transformer)
        wanted |= {"model_index.json"} | {s.rfilename for s in info.siblings if s.rfilename.split("/")[0] in folders}
    listed = {s.rfilename: s for s in info.siblings}
    missing = sorted(wanted - set(listed))
    if missing:
        raise DownloadError(f"{need.repo_id} has no {', '.join(missing)} (needed by {', '.join(need.variants)})")
    files = [RemoteFile(need.repo_id, name, listed[name].size or 0,
                        listed[name].lfs.sha256 if listed[name].lfs else None, listed[name].blob_id)
             for name in sorted(wanted)]
    return info.sha, files


def _cached(file: RemoteFile, commit: str, cache_dir: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(file.repo_id, file.path, cache_dir=cache_dir, revision=commit)
    return Path(found) if isinstance(found, str) else None


def check_free_space(need_bytes: float, free_bytes: float, where: str, keep_free_gb: float) -> None:
    """Refuse before downloading when ``need_bytes`` would leave less than ``keep_free_gb`` free."""
    short = need_bytes + keep_free_gb * GB - free_bytes
    if short > 0:
        raise DownloadError(
            f"not enough disk at {where}: the download needs {need_bytes / GB:.2f} GB and {keep_free_gb:g} GB "
            f"should stay free, but {free_bytes / GB:.2f} GB are free: {short / GB:.2f} GB missing")


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # git's object id, not a security hash
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(file: RemoteFile, path: Path) -> str | None:
    """Why ``path`` is not ``file`` as the Hub lists it, or None when it is."""
    size = path.stat().st_size
    if size != file.size:
        return f"{size} bytes, the Hub says {file.size}"
    if file.sha256 is not None and _sha256(path) != file.sha256:
        return "its sha256 differs from the Hub's"
    if file.sha256 is None and file.blob_id is not None and _git_blob_id(path) != file.blob_id:
        return "its git blob id differs from the Hub's"
    return None


def hub_cache_dir(config: AppConfig, override: str | None = None) -> str:
    if override or config.hf.cache_dir:
        return str(override or config.hf.cache_dir)
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def hub_endpoint() -> str:
    """The Hub this process talks to: ``HF_ENDPOINT``, else huggingface_hub's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx before its 2.0, httpx2 since)."""
    import sys

    import huggingface_hub.utils  # noqa: F401 - imports that client

    return tuple(module.TransportError for name in ("httpx2", "httpx") if (module := sys.modules.get(name)))


@contextlib.contextmanager
def hub_errors_in_one_line(what: str) -> Iterator[None]:
    """Turn the Hub's failures while doing ``what`` into a DownloadError of one line: which endpoint, what went
    wrong, what to do. Without a network the client's own error is a 70-line traceback naming neither."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = hub_endpoint()
    try:
        yield
    except _transport_errors() as err:
        raise DownloadError(
            f"cannot reach the Hub at {endpoint} for {what} ({type(err).__name__}: {_first_line(err)}): check the "
            "network, or point HF_ENDPOINT at a Hub mirror you can reach (HF_ENDPOINT=https://... imageserve "
            "download ...)") from None
    except (GatedRepoError, RepositoryNotFoundError) as err:
        raise DownloadError(
            f"the Hub at {endpoint} does not let this machine read {what} ({_first_line(err)}): check the repository "
            "id, and for a gated model accept its terms on the Hub and set HF_TOKEN") from None
    except HfHubHTTPError as err:
        raise DownloadError(f"the Hub at {endpoint} failed {what} ({_first_line(err)}): try again later, or set "
                            "HF_ENDPOINT to a mirror") from None


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def download(config: AppConfig, cache_dir: str | None = None, keep_free_gb: float = DEFAULT_KEEP_FREE_GB,
             dry_run: bool = False, log=print) -> dict[str, Any]:
    """Fetch and verify what ``config`` loads; returns what was needed, fetched and found in the cache."""
    from huggingface_hub import snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    cache = hub_cache_dir(config, cache_dir)
    repos, local = needs(config)
    for variant, path in local.items():
        log(f"{variant}: local {path}, nothing to fetch")
    planned: list[tuple[RepoNeed, str, list[RemoteFile]]] = []
    for need in repos:
        with hub_errors_in_one_line(f"{need.repo_id}'s file list"):
            commit, files = remote_files(need, endpoint, cache)
        planned.append((need, commit, files))
    total = sum(f.size for _, _, files in planned for f in files)
    to_fetch = sum(f.size for _, commit, files in planned for f in files if _cached(f, commit, cache) is None)
    for need, commit, files in planned:
        what = "pipeline" + ("" if need.with_transformer else " without transformer/") if need.pipeline else "file"
        log(f"{need.repo_id}@{commit[:12]}: {len(files)} files, {sum(f.size for f in files) / GB:.2f} GB "
            f"({what}; for {', '.join(sorted(set(need.variants)))})")
        if need.revision is None:
            key = "revision" if need.pipeline else "transformer_revision"
            log(f"  not pinned: main may move; to keep every node on this commit set "
                f"{', '.join(f'models.{v}.{key}' for v in sorted(set(need.variants)))}: {commit}")
    log(f"{total / GB:.2f} GB in all, {to_fetch / GB:.2f} GB not in {cache} yet")
    check_free_space(to_fetch, free_disk_gb(cache) * GB, cache, keep_free_gb)
    report = {"cache_dir": cache, "total_bytes": total, "fetched_bytes": to_fetch, "local": local,
              "repos": {need.repo_id: {"commit": commit, "pinned": need.revision is not None,
                                       "files": [f.path for f in files]}
                        for need, commit, files in planned}}
    if dry_run:
        return report
    for need, commit, files in planned:
        # Unpinned: revision "main" (not the commit), so that the cache's refs/main points at it for offline
        # loading without a revision. Pinned: the commit, which loading asks for too.
        with hub_errors_in_one_line(f"{need.repo_id}'s files (run again to resume)"):
            snapshot = Path(snapshot_download(need.repo_id, revision=need.revision,
                                              allow_patterns=[f.path for f in files], cache_dir=cache,
                                              endpoint=endpoint))
        if snapshot.name != commit:
            raise DownloadError(f"{need.repo_id} moved from {commit} to {snapshot.name} while downloading: run again")
        for file in files:
            reason = verify(file, snapshot / file.path)
            if reason is not None:
                blob = (snapshot / file.path).resolve()
                (snapshot / file.path).unlink(missing_ok=True)
                blob.unlink(missing_ok=True)
                raise DownloadError(f"{need.repo_id}/{file.path} failed its check ({reason}); it was removed: "
                                    "run the download again")
        log(f"{need.repo_id}: {len(files)} files verified")
    return report
