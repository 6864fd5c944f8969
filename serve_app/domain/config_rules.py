"""The rules of an imageserve config that span sections: what names a catalog variant, pool, swap group or
LoRA must match, which combinations cannot work (``compatibility.RULES``), and pinned revisions. Each rule is a
function of the validated config and the catalog it builds (built once); each raises ``ValueError`` naming the
key at fault, which pydantic reports with the rest of the config's errors."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from serve_app.domain.catalog import Catalog
from serve_app.domain.compatibility import config_refusals
from serve_app.domain.parallelism import ParallelMode, parallel_problem

if TYPE_CHECKING:
    from serve_app.domain.config import AppConfig

LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # schemas.LORA_NAME_PATTERN: what requests may name
# Attention backends diffusers 0.42.1 registers with supports_context_parallel (models/attention_dispatch.py) that
# a config may name; the default (unset) is native.
CONTEXT_PARALLEL_BACKENDS = ("native", "_native_cudnn", "_native_flash", "flash", "sage")


def models_are_catalog_variants(config: AppConfig, catalog: Catalog) -> None:
    unknown = [m for m in config.models if m not in catalog.variants]
    if unknown:
        raise ValueError(f"models: unknown variant(s) {unknown}; known: {', '.join(sorted(catalog.variants))}")


def pools_name_known_gpus_and_variants(config: AppConfig, catalog: Catalog) -> None:
    names = [p.name for p in config.pools]
    if len(names) != len(set(names)):
        raise ValueError(f"pools: names must be unique, got {names}")
    for pool in config.pools:
        try:
            catalog.gpu(pool.gpu_class)
        except KeyError as err:
            raise ValueError(f"pools.{pool.name}.gpu_class: {err.args[0]}") from None
        unknown_variants = [v for v in pool.variants or [] if v not in catalog.variants]
        if unknown_variants:
            raise ValueError(f"pools.{pool.name}.variants: unknown {unknown_variants}")


def load_lists_configured_models(config: AppConfig, catalog: Catalog) -> None:
    if config.load is not None:
        not_listed = [m for m in config.load if m not in config.models]
        if not_listed:
            raise ValueError(f"load: {not_listed} are not configured under models")


def swap_groups_hold_loaded_models_once(config: AppConfig, catalog: Catalog) -> None:
    grouped: dict[str, str] = {}
    loaded = config.models_to_load()
    for group in config.swap_groups:
        missing = [v for v in group.variants if v not in loaded]
        if missing:
            raise ValueError(f"swap_groups.{group.name}.variants: {missing} are not configured and enabled "
                             "under models (and load, when given)")
        for variant_id in group.variants:
            if variant_id in grouped:
                raise ValueError(f"swap_groups: {variant_id} is in both {grouped[variant_id]} and {group.name}")
            grouped[variant_id] = group.name
    group_names = [g.name for g in config.swap_groups]
    if len(group_names) != len(set(group_names)):
        raise ValueError(f"swap_groups: names must be unique, got {group_names}")


def loras_are_requestable_and_exist(config: AppConfig, catalog: Catalog) -> None:
    """LoRA names requests can give, and sources and variants that exist (where a LoRA may apply is one of
    ``compatibility.RULES``)."""
    for name, lora in config.loras.items():
        if not re.fullmatch(LORA_NAME, name):
            raise ValueError(f"loras: {name!r} is not a name requests can give ({LORA_NAME})")
        if not lora.is_local and lora.file is None:
            raise ValueError(f"loras.{name}.file: a hub repo source needs the weight file's name")
        unknown = [v for v in lora.variants if v not in catalog.variants]
        if unknown:
            raise ValueError(f"loras.{name}.variants: {', '.join(unknown)} is no catalog variant")


def combinations_can_work(config: AppConfig, catalog: Catalog) -> None:
    refusals = config_refusals(config)
    if refusals:
        raise ValueError("combinations that cannot work (docs/compatibility.md):\n    "
                         + "\n    ".join(str(refusal) for refusal in refusals))


def parallel_modes_can_run(config: AppConfig, catalog: Catalog) -> None:
    """A model's ``parallel`` mode must suit its variant, the device, and a pool's nodes (combinations with other
    options are ``compatibility.RULES``)."""
    for model_id in config.models_to_load():
        text = config.models[model_id].parallel
        if text is None:
            continue
        mode = ParallelMode.parse(text)
        where = f"models.{model_id}.parallel: {text}"
        if (problem := parallel_problem(catalog.variant(model_id), mode)) is not None:
            raise ValueError(f"{where}: {problem}")
        backend = config.models[model_id].optimizations.attention_backend
        if mode.kind == "cp" and backend is not None and backend not in CONTEXT_PARALLEL_BACKENDS:
            raise ValueError(f"{where}: attention_backend {backend!r} has no context-parallel path in diffusers "
                             f"0.42.1; use one of {', '.join(CONTEXT_PARALLEL_BACKENDS)} or leave it unset")
        if mode.kind == "tp" and config.device.device == "cpu":
            raise ValueError(f"{where}: diffusers 0.42.1 shards tensors only on cuda, neuron, tpu and xpu devices "
                             "(hooks/tensor_parallel.py); on CPU use cp")
        pools = [p for p in config.pools if p.variants is None or model_id in p.variants]
        if config.pools and not any(p.gpus_per_node >= mode.degree for p in pools):
            raise ValueError(f"{where}: no pool that may host it has {mode.degree} GPUs per node "
                             f"(pools.<name>.gpus_per_node)")


def revisions_are_pinned_where_required(config: AppConfig, catalog: Catalog) -> None:
    if not config.hf.require_pinned_revisions:
        return
    unpinned = [f"models.{model_id}.{key}" for model_id in config.models_to_load()
                for key, pin in zip(("revision", "transformer_revision", "lora_revision"),
                                    (*config.weights(model_id, catalog), config.lora_weights(model_id, catalog)),
                                    strict=True)
                if pin.repo is not None and pin.revision is None]
    unpinned += [f"loras.{name}.revision" for name, lora in config.loras.items()
                 if not lora.is_local and lora.revision is None]
    if unpinned:
        raise ValueError(f"hf.require_pinned_revisions: {', '.join(unpinned)} must name a commit "
                         "(`imageserve download` prints the commits it fetched)")


Rule = Callable[["AppConfig", Catalog], None]
# In order: a rule may rely on those before it (the compatibility rules read known variants and pools).
RULES: tuple[Rule, ...] = (
    models_are_catalog_variants, pools_name_known_gpus_and_variants, load_lists_configured_models,
    swap_groups_hold_loaded_models_once, loras_are_requestable_and_exist, combinations_can_work,
    parallel_modes_can_run, revisions_are_pinned_where_required,
)


def check_config(config: AppConfig, check_compatibility: bool = True) -> None:
    """Every rule, on one catalog; ``check_compatibility=False`` skips ``combinations_can_work`` (doctor lists
    those refusals instead)."""
    catalog = config.build_catalog()
    for rule in RULES:
        if rule is combinations_can_work and not check_compatibility:
            continue
        rule(config, catalog)
