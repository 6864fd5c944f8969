"""Which features combine: every option a config or a request sets is an *axis*; each pair of values either
works (a scenario on the tiny models runs it), is refused at load with the reason, or needs a GPU to verify.

This module is the one place that says so:

* ``AXES``: the axes, their values, where a user sets each, and which values run on a CPU;
* ``RULES``: the pairs that cannot work, each with its reason. ``config_refusals`` applies them to a config
  (``AppConfig`` refuses to load with every one that applies; ``imageserve doctor --config`` lists them);
* ``cpu_scenarios``: a pairwise covering array, generated from the axes (not picked by hand), of rows that no
  rule refuses and that run on a CPU. tests/serve_app/engines/test_compatibility_matrix.py runs every row on the tiny
  models and checks that the request after the row gives the image a freshly loaded engine gives;
* ``pair_verdicts``: for every pair of values, works (the scenario that runs it), refused (why), or needs a
  GPU. ``python -m serve_app.domain.compatibility`` prints the tables of docs/compatibility.md.

Plain Python over the catalog; nothing here imports torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve_app.domain.catalog import Catalog, ModelVariant

if TYPE_CHECKING:
    from serve_app.domain.config import AppConfig

Row = Mapping[str, str]


@dataclass(frozen=True)
class Axis:
    """One option. ``cpu_values`` run on a CPU (the rest need a GPU); ``config_key`` is where a config sets it
    (None: a request sets it, and no config can refuse it)."""

    name: str
    values: tuple[str, ...]
    set_by: str
    cpu_values: tuple[str, ...]
    config_key: str | None = None


AXES: tuple[Axis, ...] = (
    Axis("task", ("generate", "edit"), "the variant: Z-Image generates, Qwen-Image-Edit edits",
         ("generate", "edit"), "models"),
    Axis("precision", ("bf16", "nunchaku-4bit", "fp8", "lightning"),
         "the variant: bf16, a nunchaku SVDQuant 4-bit transformer, torchao fp8, or a Lightning LoRA fused at load",
         ("bf16", "nunchaku-4bit", "fp8", "lightning"), "models"),
    Axis("offload", ("none", "model", "sequential"),
         "models.<id>.offload_mode or device.offload_mode (the planner's choice when auto)", ("none",), "offload_mode"),
    Axis("step_cache", ("off", "first_block", "taylorseer"), "models.<id>.optimizations.step_cache",
         ("off", "first_block", "taylorseer"), "optimizations.step_cache"),
    Axis("attention", ("default", "masked", "maskless"),
         "models.<id>.optimizations.attention_backend: masked kernels (native, _native_math, _native_efficient, "
         "_native_cudnn, xformers) or maskless ones (flash, sage, _native_flash); CPU runs _native_math and "
         "_native_flash", ("default", "masked", "maskless"), "optimizations.attention_backend"),
    Axis("lora", ("off", "on"), "a request's `lora` (the config's `loras:` lists the variant)", ("off", "on"),
         "loras"),
    Axis("swap_group", ("alone", "member"), "swap_groups: (the variant takes turns on a GPU with others)",
         ("alone", "member"), "swap_groups"),
    Axis("batching", ("off", "on"), "models.<id>.max_batch_size > 1", ("off", "on"), "max_batch_size"),
    Axis("compile", ("off", "on"), "models.<id>.optimizations.compile_transformer", ("off", "on"),
         "optimizations.compile_transformer"),
    Axis("streaming", ("off", "on"), "a request's `stream: true` (with partial_images)", ("off", "on")),
    Axis("cancel", ("no", "yes"), "a request cancelled mid-denoising (its caller left)", ("no", "yes")),
    Axis("failure", ("no", "yes"), "a request failing mid-call (an error inside the pipeline)", ("no", "yes")),
    Axis("parallel", ("off", "context", "tensor"), "models.<id>.parallel (cp2.., tp2..) or the planner's choice on a "
         "pool", ("off",), "parallel"),
)
AXIS = {axis.name: axis for axis in AXES}

# Values that run on a CPU only through a test double (their kernels need CUDA).
CPU_THROUGH_DOUBLES = {("precision", "nunchaku-4bit"): "the test doubles of nunchaku's releases, as its 4-bit "
                                                        "kernels need CUDA"}

# Values that run on a CPU, but in several processes, so outside the one-engine scenarios below.
CPU_IN_SEVERAL_PROCESSES = {("parallel", "context"): "2 gloo ranks in Ray actors: "
                                                     "tests/deployments/test_parallel_replica.py"}

MASKED_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_cudnn", "xformers")
MASKLESS_BACKENDS = ("flash", "sage", "_native_flash")
# What a CPU scenario runs for each attention value.
CPU_ATTENTION_BACKEND = {"masked": "_native_math", "maskless": "_native_flash"}


@dataclass(frozen=True)
class Rule:
    """A pair that cannot work: ``first`` and ``second`` are (axis, values); ``when`` narrows it to rows where
    another axis has some value (``when_text`` says which); ``catalog`` marks a pair no variant has, so no config
    can ask for it."""

    first: tuple[str, frozenset[str]]
    second: tuple[str, frozenset[str]]
    reason: str
    when: tuple[str, frozenset[str]] | None = None
    when_text: str = ""
    catalog: bool = False

    def applies(self, row: Row) -> bool:
        """Whether this rule refuses ``row`` (a partial row: axes it lacks do not match)."""
        (a, a_values), (b, b_values) = self.first, self.second
        if row.get(a) not in a_values or row.get(b) not in b_values:
            return False
        return self.when is None or row.get(self.when[0]) in self.when[1]

    def names(self, row: Row) -> str:
        return f"{self.first[0]}={row[self.first[0]]} with {self.second[0]}={row[self.second[0]]}"


def _rule(first: str, first_values: str, second: str, second_values: str, reason: str, **kwargs) -> Rule:
    return Rule((first, frozenset(first_values.split())), (second, frozenset(second_values.split())), reason, **kwargs)


CACHED = "first_block taylorseer"
RULES: tuple[Rule, ...] = (
    _rule("task", "generate", "precision", "lightning", "no generation variant is Lightning: the Lightning LoRAs "
          "are distilled for Qwen-Image-Edit", catalog=True),
    _rule("task", "generate", "step_cache", CACHED,
          "diffusers 0.42's ZImagePipeline has no step-cache support (its transformer has no enable_cache and the "
          "pipeline resets no cache state between calls), and QwenImage21Pipeline's cached prefix is untried with "
          "it; step caching is for the Qwen-Image-Edit variants"),
    _rule("task", "edit", "batching", "on", "the edit pipeline takes one image set per call; batching is for "
          "generation variants"),
    _rule("precision", "lightning", "batching", "on", "Lightning variants edit, and the edit pipeline takes one "
          "image set per call; batching is for generation variants"),
    _rule("step_cache", CACHED, "batching", "on", "step caching is for the edit pipelines and batching for the "
          "generation ones: no variant takes both"),
    _rule("precision", "nunchaku-4bit", "step_cache", CACHED,
          "nunchaku's 4-bit transformer does not take diffusers' cache hooks"),
    _rule("precision", "nunchaku-4bit", "compile", "on",
          "nunchaku's 4-bit transformer runs custom CUDA kernels that torch.compile cannot trace; compile only bf16 "
          "and fp8 variants"),
    _rule("precision", "nunchaku-4bit", "lora", "on",
          "nunchaku's 4-bit transformer is not reached by diffusers' PEFT LoRA loading; list bf16 variants"),
    _rule("precision", "nunchaku-4bit", "attention", "masked maskless",
          "nunchaku's attention modules are not diffusers' and take no attention backend (diffusers' "
          "set_attention_backend would change nothing)"),
    _rule("precision", "fp8", "lora", "on", "the fp8 transformer holds torchao fp8 weights, which PEFT's LoRA "
          "layers do not wrap; list bf16 variants"),
    _rule("lora", "on", "compile", "on", "a per-request LoRA would recompile the transformer whenever the active "
          "adapter changes; turn compile_transformer off for it"),
    _rule("lora", "on", "swap_group", "member",
          "a swap group's routing names the variant, not the LoRA, and its host copies are taken once while a LoRA "
          "load changes the transformer; serve LoRAs from a variant's own deployment"),
    _rule("task", "generate", "attention", "maskless",
          "maskless kernels (flash, sage, _native_flash) take no attention mask, and ZImagePipeline masks the "
          "padding of batched prompts and of every CFG call; use a masked backend (_native_cudnn, "
          "_native_efficient) or leave it unset"),
    _rule("attention", "maskless", "batching", "on",
          "maskless kernels take no attention mask, and a batch pads its prompts to one length and masks the "
          "padding"),
    _rule("precision", "fp8", "offload", "sequential",
          "sequential offload is off for fp8 variants (per_block_offload: false in the catalog): accelerate's "
          "per-module hooks are untried on torchao's tensor subclasses"),
    _rule("parallel", "context tensor", "precision", "nunchaku-4bit",
          "nunchaku's 4-bit transformer is not a diffusers model: diffusers' parallelism does not reach it"),
    _rule("parallel", "context tensor", "precision", "fp8",
          "torchao's fp8 weights are untried under diffusers' DTensor sharding and context-parallel hooks"),
    _rule("parallel", "context tensor", "step_cache", CACHED,
          "each rank's step cache would decide from its own share of the first block's output: ranks would skip "
          "different steps and wait on each other in a collective"),
    _rule("parallel", "context tensor", "compile", "on",
          "torch.compile is untried over diffusers' context-parallel hooks and DTensor shards; turn "
          "compile_transformer off"),
    _rule("parallel", "context tensor", "swap_group", "member",
          "a swap group takes turns on one GPU; a multi-GPU replica holds several"),
    _rule("parallel", "context tensor", "offload", "sequential",
          "sequential offload streams the transformer every step, the cost a multi-GPU replica exists to avoid; "
          "use none or model"),
    _rule("precision", "nunchaku-4bit", "offload", "sequential",
          "nunchaku's Z-Image transformer has no per-block offload in any release",
          when=("task", frozenset({"generate"})), when_text="generation variants"),
)


def precision_kind(variant: ModelVariant) -> str:
    """The precision axis' value of a catalog variant."""
    if variant.requires_nunchaku:
        return "nunchaku-4bit"
    if variant.precision == "fp8":
        return "fp8"
    if variant.source.lora_file is not None:
        return "lightning"
    return "bf16"


def variant_for(catalog: Catalog, task: str, precision: str) -> ModelVariant:
    """The first catalog variant of ``task`` whose precision axis is ``precision`` (a scenario's model)."""
    for variant in catalog.variants.values():
        if task in variant.tasks and precision_kind(variant) == precision:
            return variant
    raise LookupError(f"no {task} variant of precision {precision} in the catalog")


def attention_kind(backend: str | None) -> str:
    if backend is None:
        return "default"
    return "maskless" if backend in MASKLESS_BACKENDS else "masked"


def refusing_rules(row: Row) -> list[Rule]:
    """The rules that refuse ``row`` (a full or partial row of axis values)."""
    return [rule for rule in RULES if rule.applies(row)]


# ---- a configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A rule that applies to one configured model: where, which pair, and why."""

    model_id: str
    rule: Rule
    row: Mapping[str, str]

    def __str__(self) -> str:
        keys = " and ".join(AXIS[axis].config_key for axis in (self.rule.first[0], self.rule.second[0])
                            if AXIS[axis].config_key not in (None, "models"))
        return f"models.{self.model_id}{f' ({keys})' if keys else ''}: {self.rule.names(self.row)}: {self.rule.reason}"


def model_rows(config: AppConfig, model_id: str, catalog: Catalog | None = None) -> list[dict[str, str]]:
    """The axis values ``config`` sets for ``model_id``, one row per task its variant serves (a variant of a
    family that both generates and edits meets the rules of both)."""
    variant = (catalog or config.build_catalog()).variant(model_id)
    return [model_row(config, model_id, task, catalog) for task in variant.tasks]


def model_row(config: AppConfig, model_id: str, task: str, catalog: Catalog | None = None) -> dict[str, str]:
    """The axis values ``config`` sets for ``model_id`` serving ``task`` (offload only when forced; request axes
    absent)."""
    variant = (catalog or config.build_catalog()).variant(model_id)
    model = config.models[model_id]
    options = model.optimizations
    row = {
        "task": task,
        "precision": precision_kind(variant),
        "step_cache": options.step_cache.kind if options.step_cache is not None else "off",
        "attention": attention_kind(options.attention_backend),
        "lora": "on" if config.loras_for(model_id) else "off",
        "swap_group": "member" if config.swap_group_of(model_id) is not None else "alone",
        "batching": "on" if model.max_batch_size > 1 else "off",
        "compile": "on" if options.compile_transformer else "off",
        "parallel": {None: "off", "c": "context", "t": "tensor"}[model.parallel[0] if model.parallel else None],
    }
    if (forced := config.offload_mode_for(model_id)) is not None:
        row["offload"] = forced
    return row


def config_refusals(config: AppConfig) -> list[Refusal]:
    """Every rule that refuses a pair ``config`` sets on one of its models."""
    refusals = []
    catalog = config.build_catalog()
    for model_id in config.models:
        seen: set[Rule] = set()
        for row in model_rows(config, model_id, catalog):
            shown = dict(row)  # the config's own words where the axis groups several
            if (backend := config.models[model_id].optimizations.attention_backend) is not None:
                shown["attention"] = f"{row['attention']} ({backend!r})"
            refusals += [Refusal(model_id, rule, shown) for rule in refusing_rules(row) if rule not in seen]
            seen.update(refusing_rules(row))
    return refusals


# ---- the pairwise scenarios ---------------------------------------------------------------------------------

Pair = tuple[tuple[str, str], tuple[str, str]]


def all_pairs(values: Callable[[Axis], Iterable[str]] = lambda axis: axis.values) -> list[Pair]:
    """Every pair of values of two different axes, in axis order."""
    return [((a.name, x), (b.name, y)) for a, b in itertools.combinations(AXES, 2)
            for x in values(a) for y in values(b)]


def _row_pairs(row: Row) -> set[Pair]:
    names = [axis.name for axis in AXES if axis.name in row]
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}


def valid_cpu_rows() -> list[dict[str, str]]:
    """Every full row of CPU values that no rule refuses (a few thousand: enumerated)."""
    rows = []
    for values in itertools.product(*(axis.cpu_values for axis in AXES)):
        row = dict(zip((axis.name for axis in AXES), values, strict=True))
        if not refusing_rules(row):
            rows.append(row)
    return rows


def cpu_scenarios() -> list[dict[str, str]]:
    """A pairwise covering array of CPU rows: every pair of CPU values that some valid row holds is held by one
    of these rows. Greedy and deterministic: each row is the valid row covering the most pairs not yet covered
    (the first such in axis-value order)."""
    candidates = valid_cpu_rows()
    covered_by = [_row_pairs(row) for row in candidates]
    uncovered = set().union(*covered_by)
    scenarios = []
    while uncovered:
        best = max(range(len(candidates)), key=lambda i: (len(covered_by[i] & uncovered), -i))
        scenarios.append(candidates[best])
        uncovered -= covered_by[best]
    return scenarios


@dataclass(frozen=True)
class Verdict:
    """What the project knows of one pair: ``works`` (scenario index), ``refused`` (rules), or ``gpu``."""

    pair: Pair
    kind: str  # "works", "refused", "gpu"
    scenario: int | None = None
    rules: tuple[Rule, ...] = ()
    note: str = ""


def pair_verdicts(scenarios: list[dict[str, str]] | None = None) -> list[Verdict]:
    """A verdict for every pair of every two axes' values.

    Refused: a rule names the pair (without a ``when``). Works: a CPU scenario holds it. Needs a GPU: the rest,
    each because one of its values has no CPU run (and a note for rules that refuse it in some rows).
    Raises when a pair is neither: every row holding it is refused by rules that each name something else (an
    implied refusal), which deserves a rule of its own with its own reason.
    """
    scenarios = cpu_scenarios() if scenarios is None else scenarios
    where = {}
    for index, row in enumerate(scenarios):
        for pair in _row_pairs(row):
            where.setdefault(pair, index)
    verdicts = []
    for pair in all_pairs():
        row = dict(pair)
        direct = tuple(rule for rule in RULES if rule.when is None and rule.applies(row))
        if direct:
            verdicts.append(Verdict(pair, "refused", rules=direct))
            continue
        if pair in where:
            verdicts.append(Verdict(pair, "works", scenario=where[pair]))
            continue
        on_cpu = all(value in AXIS[axis].cpu_values for axis, value in pair)
        if on_cpu:
            raise ValueError(f"{pair} is refused only by implication: give it a rule of its own")
        conditional = tuple(rule for rule in RULES if rule.when is not None
                            and {rule.first[0], rule.second[0]} == {pair[0][0], pair[1][0]}
                            and rule.applies({**row, rule.when[0]: next(iter(rule.when[1]))}))
        verdicts.append(Verdict(pair, "gpu", rules=conditional))
    return verdicts


# ---- docs/compatibility.md ----------------------------------------------------------------------------------

GENERATED_BY = "python -m serve_app.domain.compatibility"


def markdown() -> str:
    """The matrix as docs/compatibility.md holds it (between its generated-section markers)."""
    scenarios = cpu_scenarios()
    verdicts = pair_verdicts(scenarios)
    lines = [f"<!-- generated by `{GENERATED_BY}`; tests/serve_app/domain/test_compatibility.py checks it -->", "",
             "**Axes.**", "", "| axis | values | set by | runs on CPU |", "|---|---|---|---|"]
    for axis in AXES:
        cpu = ", ".join(f"{v} (through {CPU_THROUGH_DOUBLES[(axis.name, v)]})"
                        if (axis.name, v) in CPU_THROUGH_DOUBLES else v for v in axis.cpu_values)
        cpu += "".join(f"; {v} in several processes ({where})" for (name, v), where in CPU_IN_SEVERAL_PROCESSES.items()
                       if name == axis.name)
        lines.append(f"| {axis.name} | {', '.join(axis.values)} | {axis.set_by} | {cpu} |")
    counts = {kind: sum(v.kind == kind for v in verdicts) for kind in ("works", "refused", "gpu")}
    lines += ["", f"**{len(verdicts)} pairs of values**: {counts['works']} work (tested), {counts['refused']} "
              f"are refused at load, {counts['gpu']} need a GPU to verify.", "",
              "**Refused at load** (the config names the model, both settings and the reason; `imageserve doctor "
              "--config FILE` lists the refusals that apply to a config):", "", "| pair | why |", "|---|---|"]
    seen = set()
    for rule in RULES:
        if rule.when is None and rule not in seen:
            seen.add(rule)
            first = f"{rule.first[0]}={'/'.join(sorted(rule.first[1]))}"
            second = f"{rule.second[0]}={'/'.join(sorted(rule.second[1]))}"
            how = "no such variant in the catalog: " if rule.catalog else ""
            lines.append(f"| {first} with {second} | {how}{rule.reason} |")
    lines += ["", "**Need a GPU to verify** (no CPU run: CUDA offload hooks need an accelerator); each value, "
              "with every value of the other axes that no rule above refuses:", ""]
    for axis in AXES:
        for value in axis.values:
            if value in axis.cpu_values:
                continue
            partners = [v for v in verdicts if v.kind == "gpu" and (axis.name, value) in v.pair]
            notes = sorted({f"refused for {r.when_text}: {r.reason}" for v in partners for r in v.rules})
            lines.append(f"- {axis.name}={value}: {len(partners)} pairs" + (f" ({'; '.join(notes)})" if notes else ""))
    lines += ["", "**Tested** (tests/serve_app/engines/test_compatibility_matrix.py runs each row on the tiny models; "
              "the request after it, of another size and seed, must give the image a freshly loaded engine gives):",
              "",
              "| # | " + " | ".join(axis.name for axis in AXES) + " |", "|---" * (len(AXES) + 1) + "|"]
    for index, row in enumerate(scenarios):
        lines.append(f"| {index} | " + " | ".join(row[axis.name] for axis in AXES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
