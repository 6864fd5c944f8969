"""Per-request LoRAs: loaded through diffusers' PEFT integration from tiny LoRAs built offline with peft, kept
in an LRU of adapter slots, hotswapped into the least recently used slot, and switched per pipeline call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.errors import UnsupportedValueError
from serve_app.domain.schemas import EditRequest, GenerateRequest, LoraRequest
from serve_app.domain.specs import engine_spec
from serve_app.embedded import tiny_model_config
from serve_app.engines import load_engine
from serve_app.engines.loras import lora_rank
from serve_app.engines.protocol import Job, ModelLoadError
from serve_app.engines.random_weights import build_tiny_lora, tiny_checkpoint


@pytest.fixture(scope="module")
def z_loras(tiny_root, tmp_path_factory):
    """Three tiny Z-Image LoRAs: two of rank 4 and one of rank 8, all different."""
    folder = tmp_path_factory.mktemp("z-loras")
    checkpoint = tiny_checkpoint(tiny_root, "z-image-turbo")
    return {name: build_tiny_lora(checkpoint, folder / f"{name}.safetensors", seed=seed, rank=rank)
            for name, seed, rank in (("ink", 11, 4), ("oil", 12, 8), ("neon", 13, 4))}


def engine_with(tiny_root, catalog, variant_id, loras: dict, **model):
    variant = catalog.variant(variant_id)
    config = parse_config({
        "device": {"device": "cpu"},
        "models": {variant_id: {**tiny_model_config(tiny_root, variant), **model}},
        "loras": {name: {"source": str(path), "variants": [variant_id]} for name, path in loras.items()},
    })
    return load_engine(engine_spec(config, variant, catalog))


def generate(engine, lora: LoraRequest | None = None):
    (result,) = engine.run([Job(GenerateRequest(prompt="a red fox", seed=3, lora=lora), 64, 64, 2)],
                           should_stop=lambda: False)
    return result


def test_a_per_request_lora_changes_the_image_and_its_scale_weighs_it(tiny_root, catalog, z_loras):
    engine = engine_with(tiny_root, catalog, "z-image-turbo", z_loras)
    plain = generate(engine).images[0]
    ink = generate(engine, LoraRequest(name="ink")).images[0]
    half = generate(engine, LoraRequest(name="ink", scale=0.5)).images[0]
    none = generate(engine, LoraRequest(name="ink", scale=0.0)).images[0]
    assert np.abs(ink - plain).mean() > 1e-3
    assert 0 < np.abs(half - plain).mean() < np.abs(ink - plain).mean()
    np.testing.assert_allclose(none, plain, atol=1e-6)  # scale 0 adds nothing
    # A request without a LoRA after one with it runs the plain transformer again.
    np.testing.assert_array_equal(generate(engine).images[0], plain)


def test_the_lru_keeps_the_recent_loras_and_hotswaps_the_oldest(tiny_root, catalog, z_loras):
    engine = engine_with(tiny_root, catalog, "z-image-turbo", z_loras, max_loaded_loras=2)
    fresh = {name: generate(engine_with(tiny_root, catalog, "z-image-turbo", {name: z_loras[name]}),
                            LoraRequest(name=name)).images[0] for name in ("oil", "neon")}
    first = generate(engine, LoraRequest(name="ink"))
    assert "lora_load_s" in first.timings
    generate(engine, LoraRequest(name="oil"))
    hit = generate(engine, LoraRequest(name="ink"))  # ink is now the most recently used
    assert "lora_load_s" not in hit.timings
    neon = generate(engine, LoraRequest(name="neon")).images[0]  # replaces oil, in oil's slot
    assert engine.adapters.loaded == ["ink", "neon"]
    assert engine.adapters.counts == {"load": 2, "hit": 1, "hotswap": 1}
    assert engine.pipe.get_list_adapters()["transformer"] == ["slot0", "slot1"]  # no adapter added or dropped
    np.testing.assert_allclose(neon, fresh["neon"], atol=1e-5)  # hotswapped weights are the LoRA's own
    # oil (rank 8) into a slot that held rank 4: every slot is padded to the list's largest rank.
    oil = generate(engine, LoraRequest(name="oil")).images[0]
    np.testing.assert_allclose(oil, fresh["oil"], atol=1e-5)


@pytest.fixture(scope="module")
def z_target_loras(tiny_root, tmp_path_factory):
    """Three tiny Z-Image LoRAs of rank 4 on different module sets: the attention projections, the feed-forward
    layers (disjoint from the first), and both."""
    folder = tmp_path_factory.mktemp("z-target-loras")
    checkpoint = tiny_checkpoint(tiny_root, "z-image-turbo")
    attention, feed_forward = ["to_q", "to_k", "to_v", "to_out.0"], ["w1", "w2", "w3"]
    return {name: build_tiny_lora(checkpoint, folder / f"{name}.safetensors", seed=seed, target_modules=targets)
            for name, seed, targets in (("attn", 21, attention), ("ffn", 22, feed_forward),
                                        ("wide", 23, attention + feed_forward))}


def lora_targets(path) -> set[str]:
    """The transformer modules a LoRA file adapts (from its tensor names)."""
    with safe_open(str(path), framework="pt") as weights:
        return {key.removeprefix("transformer.").split(".lora_")[0] for key in weights.keys()}


def assert_no_leftover_lora(engine, files: dict) -> None:
    """Every LoRA layer in the transformer belongs to a loaded LoRA's slot, and adds nothing outside the modules
    that LoRA targets (a hotswap to fewer modules zeroes the rest; a fresh load must not keep an evicted one's)."""
    slots = {slot: name for name, slot in engine.adapters._slots.items()}
    for module_name, module in engine.pipe.transformer.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            assert adapter in slots, f"{module_name} keeps the layers of adapter {adapter}, which holds no LoRA"
            if module_name not in lora_targets(files[slots[adapter]]):
                delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
                assert torch.count_nonzero(delta) == 0, (
                    f"{module_name} still adds {adapter}'s old weights: {slots[adapter]} does not target it")


@pytest.mark.parametrize("capacity", [1, 2])
@pytest.mark.parametrize("layout", ["known", "unknown"])
def test_a_lora_on_other_modules_replaces_the_evicted_one_entirely(tiny_root, catalog, z_target_loras, capacity,
                                                                   layout, monkeypatch):
    # PEFT refuses to hotswap a LoRA onto modules the slot's adapter lacks; what is loaded instead must hold no
    # layer of the evicted LoRA (with 2 slots, the evicted one is not the active one). "unknown": the header check
    # cannot tell the LoRA's modules (another file layout), so the hotswap is tried and fails inside PEFT.
    if layout == "unknown":
        monkeypatch.setattr("serve_app.engines.loras.lora_modules", lambda path: None, raising=False)
    engine = engine_with(tiny_root, catalog, "z-image-turbo", z_target_loras, max_loaded_loras=capacity)
    fresh = {name: generate(engine_with(tiny_root, catalog, "z-image-turbo", {name: path}),
                            LoraRequest(name=name)).images[0] for name, path in z_target_loras.items()}
    for name in ("attn", "ffn", "wide", "attn", "ffn", "wide", "attn"):
        image = generate(engine, LoraRequest(name=name)).images[0]
        np.testing.assert_allclose(image, fresh[name], atol=1e-5, err_msg=f"{name} after {engine.adapters.counts}")
        assert_no_leftover_lora(engine, z_target_loras)
    assert engine.adapters.loaded[-1] == "attn" and len(engine.adapters.loaded) == capacity
    assert engine.adapters.counts == {"load": capacity, "hit": 0, "hotswap": 7 - capacity}


def test_a_hotswapped_lora_runs_at_its_own_alpha(tiny_root, catalog, tmp_path):
    # Same rank, alphas 4 and 16: the slot's scaling must follow the LoRA in it, at every request's scale.
    checkpoint = tiny_checkpoint(tiny_root, "z-image-turbo")
    files = {name: build_tiny_lora(checkpoint, tmp_path / f"{name}.safetensors", seed=seed, rank=4, alpha=alpha)
             for name, seed, alpha in (("soft", 31, 4), ("strong", 32, 16))}
    engine = engine_with(tiny_root, catalog, "z-image-turbo", files, max_loaded_loras=1)
    fresh = {(name, scale): generate(engine_with(tiny_root, catalog, "z-image-turbo", {name: path}),
                                     LoraRequest(name=name, scale=scale)).images[0]
             for name, path in files.items() for scale in (1.0, 0.5)}

    def scalings(name):
        slot = engine.adapters._slots[name]
        return sorted({float(module.scaling[slot]) for module in engine.pipe.transformer.modules()
                       if isinstance(module, LoraLayer) and slot in module.scaling})

    generate(engine, LoraRequest(name="soft"))
    for name, scale, alpha in (("strong", 1.0, 16), ("strong", 0.5, 16), ("soft", 0.5, 4), ("strong", 0.5, 16)):
        image = generate(engine, LoraRequest(name=name, scale=scale)).images[0]
        np.testing.assert_allclose(image, fresh[(name, scale)], atol=1e-5, err_msg=f"{name} at {scale}")
        assert scalings(name) == pytest.approx([alpha / 4 * scale])  # in every layer
    assert engine.adapters.counts == {"load": 1, "hit": 1, "hotswap": 3}


def test_a_hotswap_leaves_the_other_slots_alone_with_many_slots(tiny_root, catalog, z_loras):
    # Eleven slots: PEFT matches a slot's tensors by substring, so "slot1" must not be a prefix of "slot10".
    files = {f"style{i}": z_loras["ink"] for i in range(11)} | {"oil": z_loras["oil"]}
    engine = engine_with(tiny_root, catalog, "z-image-turbo", files, max_loaded_loras=11)
    for i in range(11):
        generate(engine, LoraRequest(name=f"style{i}"))
    last = generate(engine, LoraRequest(name="style10")).images[0]
    generate(engine, LoraRequest(name="style0"))  # style1, in the second slot, is now the least recently used
    generate(engine, LoraRequest(name="oil"))  # hotswapped into style1's slot
    assert "style1" not in engine.adapters.loaded and engine.adapters.counts["hotswap"] == 1
    np.testing.assert_array_equal(generate(engine, LoraRequest(name="style10")).images[0], last)
    names = engine.pipe.get_list_adapters()["transformer"]
    assert len(names) == 11 and not any(a != b and a in b for a in names for b in names)


def test_requests_batch_only_with_the_same_lora_and_scale(tiny_root, catalog, z_loras):
    engine = engine_with(tiny_root, catalog, "z-image-turbo", z_loras)

    def key(lora):
        return engine.batch_key(Job(GenerateRequest(prompt="x", lora=lora), 64, 64, 2))

    assert key(LoraRequest(name="ink")) == key(LoraRequest(name="ink", scale=1.0))
    assert len({key(None), key(LoraRequest(name="ink")), key(LoraRequest(name="ink", scale=0.5)),
                key(LoraRequest(name="oil"))}) == 4


def test_a_batch_with_a_lora_gives_each_request_the_image_it_gets_alone(tiny_root, catalog, z_loras):
    engine = engine_with(tiny_root, catalog, "z-image-turbo", z_loras)
    lora = LoraRequest(name="ink", scale=0.7)
    jobs = [Job(GenerateRequest(prompt=p, seed=s, lora=lora), 64, 64, 2) for p, s in (("a fox", 1), ("a cat", 2))]
    batched = engine.run(jobs, should_stop=lambda: False)
    alone = [engine.run([job], should_stop=lambda: False)[0] for job in jobs]
    assert batched[0].batch_images == 2
    for together, single in zip(batched, alone, strict=True):
        np.testing.assert_allclose(together.images[0], single.images[0], atol=1e-4)


def test_an_edit_takes_a_per_request_lora(tiny_root, catalog, png_bytes, tmp_path):
    lora = build_tiny_lora(tiny_checkpoint(tiny_root, "qwen-image-edit-2511"), tmp_path / "edit.safetensors", seed=5)
    engine = engine_with(tiny_root, catalog, "qwen-image-edit-2511", {"sketch": lora})

    def edit(lora_request):
        job = Job(EditRequest(prompt="make it blue", images=[png_bytes], seed=2, lora=lora_request), 64, 64, 2)
        return engine.run([job], should_stop=lambda: False)[0].images[0]

    assert np.abs(edit(LoraRequest(name="sketch")) - edit(None)).max() > 1e-3


def test_a_lora_the_variant_does_not_take_is_refused_with_a_400(tiny_root, catalog, z_loras):
    engine = engine_with(tiny_root, catalog, "z-image-turbo", {"ink": z_loras["ink"]})
    with pytest.raises(UnsupportedValueError, match="'oil' is not one this variant takes") as refused:
        generate(engine, LoraRequest(name="oil"))
    assert refused.value.status_code == 400 and refused.value.param == "lora"
    plain = engine_with(tiny_root, catalog, "z-image-turbo", {})
    with pytest.raises(UnsupportedValueError, match="takes no per-request LoRA"):
        generate(plain, LoraRequest(name="ink"))


def test_a_missing_or_unreadable_lora_file_fails_the_load_clearly(tiny_root, catalog, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine_with(tiny_root, catalog, "z-image-turbo", {"gone": tmp_path / "gone.safetensors"})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="not readable safetensors"):
        lora_rank(junk)


def test_lora_rank_reads_the_largest_rank_from_the_header(z_loras):
    assert lora_rank(z_loras["ink"]) == 4 and lora_rank(z_loras["oil"]) == 8


@pytest.mark.parametrize(("lora", "model", "message"), [
    ({"variants": ["z-image-turbo-svdq-int4-r128"]}, {"z-image-turbo-svdq-int4-r128": {}}, "nunchaku"),
    ({"variants": ["z-image-turbo-fp8"]}, {"z-image-turbo-fp8": {}}, "torchao fp8 weights"),
    ({"variants": ["qwen-image-edit-2512"]}, {}, "no catalog variant"),
    ({"variants": ["z-image-turbo"], "source": "someone/loras"}, {}, "needs the weight file's name"),
    ({"variants": ["z-image-turbo"]}, {"z-image-turbo": {"optimizations": {"compile_transformer": True}}},
     "recompile"),
])
def test_the_config_refuses_loras_where_they_cannot_load(lora, model, message):
    data = {"models": {"z-image-turbo": {}, **model},
            "loras": {"style": {"source": "/loras/style.safetensors", **lora}}}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_pinned_revisions_cover_hub_loras():
    data = {"models": {"z-image-turbo": {"revision": "a" * 40}}, "hf": {"require_pinned_revisions": True},
            "loras": {"style": {"source": "someone/loras", "file": "style.safetensors", "variants": ["z-image-turbo"]}}}
    with pytest.raises(ConfigError, match=r"loras\.style\.revision"):
        parse_config(data)
    data["loras"]["style"]["revision"] = "b" * 40
    assert parse_config(data).loras["style"].revision == "b" * 40
