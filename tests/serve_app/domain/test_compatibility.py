"""The compatibility matrix: every pair of every two axes' values has a verdict, the scenarios are a pairwise
covering array generated from the axes, every refused pair is refused by the config with both settings and the
reason, and docs/compatibility.md holds the current tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.domain import compatibility
from serve_app.domain.catalog import default_catalog
from serve_app.domain.compatibility import (
    AXES,
    AXIS,
    CPU_ATTENTION_BACKEND,
    RULES,
    all_pairs,
    config_refusals,
    cpu_scenarios,
    pair_verdicts,
    precision_kind,
    refusing_rules,
    variant_for,
)
from serve_app.domain.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[3]
CATALOG = default_catalog()


def test_every_pair_of_values_has_one_verdict():
    verdicts = pair_verdicts()
    assert [v.pair for v in verdicts] == all_pairs()
    assert {v.kind for v in verdicts} == {"works", "refused", "gpu"}
    for verdict in verdicts:
        if verdict.kind == "gpu":  # only values with no CPU run need a GPU
            assert any(value not in AXIS[axis].cpu_values for axis, value in verdict.pair)


def test_the_scenarios_cover_every_pair_that_runs_on_a_cpu_and_no_rule_refuses():
    scenarios = cpu_scenarios()
    held = {((a, row[a]), (b, row[b])) for row in scenarios for a, b in
            ((x.name, y.name) for i, x in enumerate(AXES) for y in AXES[i + 1:])}
    wanted = {pair for pair in all_pairs(lambda axis: axis.cpu_values)
              if not any(rule.when is None and rule.applies(dict(pair)) for rule in RULES)}
    assert wanted <= held
    assert all(not refusing_rules(row) for row in scenarios)
    assert all(row[axis.name] in axis.cpu_values for row in scenarios for axis in AXES)
    assert cpu_scenarios() == scenarios  # deterministic: the same rows every run
    assert len(scenarios) < 20  # pairwise, not the product (12,288 rows)


def test_a_pair_refused_only_by_implication_is_an_error():
    """Every refusal says its own reason: a pair that no rule names but every row holding it is refused must get
    a rule (maskless attention with batching once was one: maskless needs an edit variant, batching refuses it)."""
    rules = tuple(rule for rule in RULES if {rule.first[0], rule.second[0]} != {"attention", "batching"})
    original = compatibility.RULES
    compatibility.RULES = rules
    try:
        with pytest.raises(ValueError, match="refused only by implication"):
            pair_verdicts()
    finally:
        compatibility.RULES = original


def config_for(pair) -> dict:
    """The smallest config that sets both values of ``pair`` on one model (defaults elsewhere)."""
    row = dict(pair)
    task = row.get("task") or ("edit" if row.get("precision") == "lightning" or row.get("step_cache", "off") != "off"
                               or row.get("attention") == "maskless" else "generate")
    variant = variant_for(CATALOG, task, row.get("precision", "bf16"))
    model: dict = {"optimizations": {}}
    if "offload" in row:
        model["offload_mode"] = row["offload"]
    if row.get("step_cache", "off") != "off":
        model["optimizations"]["step_cache"] = {"kind": row["step_cache"]}
    if row.get("attention", "default") != "default":
        model["optimizations"]["attention_backend"] = CPU_ATTENTION_BACKEND[row["attention"]]
    if row.get("compile") == "on":
        model["optimizations"]["compile_transformer"] = True
    if row.get("batching") == "on":
        model["max_batch_size"] = 2
    if row.get("parallel", "off") != "off":
        model["parallel"] = {"context": "cp2", "tensor": "tp2"}[row["parallel"]]
    data = {"models": {variant.id: model}}
    if row.get("lora") == "on":
        data["loras"] = {"style": {"source": "/loras/style.safetensors", "variants": [variant.id]}}
    if row.get("swap_group") == "member":
        partner = "qwen-image-edit-2511" if variant.tasks == ("generate",) else "z-image-turbo"
        data["models"][partner] = {}
        data["swap_groups"] = [{"name": "group", "variants": [variant.id, partner]}]
    return data


REFUSED = [v for v in pair_verdicts() if v.kind == "refused"]


@pytest.mark.parametrize("verdict", REFUSED, ids=[f"{a}={x}+{b}={y}" for (a, x), (b, y) in (v.pair for v in REFUSED)])
def test_every_refused_pair_is_refused_at_load_naming_both_and_the_reason(verdict):
    catalog_only = [rule for rule in verdict.rules if rule.catalog]
    if catalog_only:  # no variant has both: no config can ask for it
        row = dict(verdict.pair)
        assert not any(row["task"] in v.tasks and precision_kind(v) == row["precision"]
                       for v in CATALOG.variants.values())
        return
    with pytest.raises(ConfigError) as refused:
        parse_config(config_for(verdict.pair))
    message = " ".join(str(refused.value).split())
    for rule in verdict.rules:
        (a, x), (b, y) = verdict.pair
        assert f"{a}={x}" in message and f"{b}={y}" in message
        assert " ".join(rule.reason.split()) in message


def test_only_settings_a_config_makes_are_refused():
    """A request's own axes (streaming, cancel, failure) combine with everything: no rule names them."""
    for rule in RULES:
        for axis, _ in (rule.first, rule.second):
            assert AXIS[axis].config_key is not None, rule


def test_the_shipped_configs_load_and_a_refused_one_lists_every_refusal():
    from serve_app.domain.config_files import load_config

    for path in (ROOT / "serve_config.yaml", ROOT / "serve_app" / "examples" / "production.yaml",
                 ROOT / "examples" / "single-gpu.yaml"):
        assert not config_refusals(load_config(path))
    data = {"models": {"z-image-turbo-svdq-int4-r128": {"optimizations": {"compile_transformer": True,
                                                                          "attention_backend": "_native_math"}}}}
    config = parse_config(data, check_compatibility=False)
    assert sorted(str(r.rule.second[0]) for r in config_refusals(config)) == ["attention", "compile"]
    with pytest.raises(ConfigError, match=r"(?s)compile=on.*attention=masked \('_native_math'\)"):
        parse_config(data)


def test_docs_compatibility_md_holds_the_current_tables():
    doc = (ROOT / "docs" / "compatibility.md").read_text()
    assert compatibility.markdown() in doc, f"regenerate with `{compatibility.GENERATED_BY}`"
