"""fp8 variants: the transformer quantized at load by torchao through diffusers' quantization config. On CPU
torchao runs fp8 weight-only (fp8 weights widened per layer); the fp8-activation recipe of CUDA is only built
here, not run (it needs fp8 tensor cores, sm_89 and newer)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from serve_app.domain.config import parse_config
from serve_app.domain.schemas import EditRequest, GenerateRequest
from serve_app.domain.specs import engine_spec
from serve_app.embedded import tiny_model_config
from serve_app.engines import load_engine
from serve_app.engines.loading import fp8_placement, fp8_quantization, holds_fp8_weights
from serve_app.engines.protocol import Job, ModelLoadError

pytest.importorskip("torchao")


def engine_for(tiny_root, catalog, variant_id):
    variant = catalog.variant(variant_id)
    config = parse_config({"device": {"device": "cpu"},
                           "models": {variant_id: tiny_model_config(tiny_root, variant)}})
    return load_engine(engine_spec(config, variant, catalog))


def test_the_fp8_generation_variant_loads_fp8_weights_and_stays_close_to_full_precision(tiny_root, catalog):
    fp8 = engine_for(tiny_root, catalog, "z-image-turbo-fp8")
    full = engine_for(tiny_root, catalog, "z-image-turbo")
    assert holds_fp8_weights(fp8.pipe.transformer) and not holds_fp8_weights(full.pipe.transformer)
    linear = next(m for m in fp8.pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    assert linear.weight.qdata.dtype == torch.float8_e4m3fn
    assert not holds_fp8_weights(fp8.pipe.text_encoder)  # only the transformer is quantized

    def image(engine):
        job = Job(GenerateRequest(prompt="a red fox", seed=4), 64, 64, 2)
        return engine.run([job], should_stop=lambda: False)[0].images[0]

    difference = np.abs(image(fp8) - image(full))
    assert 0 < difference.mean() < 0.05  # e4m3's 3 mantissa bits: a small, nonzero change


def test_the_fp8_edit_variant_loads_and_edits(tiny_root, catalog, png_bytes):
    engine = engine_for(tiny_root, catalog, "qwen-image-edit-2511-fp8")
    assert holds_fp8_weights(engine.pipe.transformer)
    job = Job(EditRequest(prompt="make it blue", images=[png_bytes], seed=1), 64, 64, 2)
    (result,) = engine.run([job], should_stop=lambda: False)
    assert result.images[0].shape[:2] == (64, 64)


def test_cuda_gets_fp8_activations_per_row_and_cpu_weight_only(catalog):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    for gpu in (None, catalog.gpu("rtx-4090"), catalog.gpu("h100-sxm")):
        cuda = fp8_quantization("cuda", gpu)
        assert isinstance(cuda, Float8DynamicActivationFloat8WeightConfig)
        granularity = cuda.granularity if isinstance(cuda.granularity, (list, tuple)) else [cuda.granularity]
        assert all(isinstance(g, PerRow) for g in granularity)
    assert isinstance(fp8_quantization("cpu"), Float8WeightOnlyConfig)


def test_blackwell_workstation_cards_get_one_scale_per_tensor(catalog):
    """cuBLAS has no row-wise fp8 scaling on sm_120 (pytorch issue 192707, PR 161236): the RTX 5090 runs fp8 with
    a scale per tensor. Only a GPU can show the matmul runs (bench/gpu_fullsize.py on an sm_120 card)."""
    from torchao.quantization import PerTensor

    rtx_5090 = catalog.gpu("rtx-5090")
    assert rtx_5090.sm == 120
    granularity = fp8_quantization("cuda", rtx_5090).granularity
    granularity = granularity if isinstance(granularity, (list, tuple)) else [granularity]
    assert all(isinstance(g, PerTensor) for g in granularity)


def test_fp8_weights_are_quantized_on_the_gpu_that_runs_them():
    """diffusers' torchao quantizer quantizes each weight on the device its device_map names, and on the host
    without one (the whole 41 GB bf16 transformer of Qwen-Image-Edit)."""
    assert fp8_placement("cuda") == {"device_map": "cuda"}
    assert fp8_placement("cpu") == {}


def test_a_torchao_that_diffusers_refuses_fails_the_load_naming_the_variant(tiny_root, catalog, monkeypatch):
    """What the node image's old lock (torchao 0.14.1) did: diffusers 0.42.1's TorchAoConfig raised a bare
    ValueError from outside the load's error handling."""
    import diffusers.quantizers.quantization_config as quantization_config

    monkeypatch.setattr(quantization_config, "is_torchao_version", lambda op, version: op == "<")  # "too old"
    with pytest.raises(ModelLoadError, match=r"z-image-turbo-fp8: loading .* failed: ValueError: TorchAoConfig "
                                             r"requires torchao >= 0.15.0"):
        engine_for(tiny_root, catalog, "z-image-turbo-fp8")


def test_without_torchao_an_fp8_variant_fails_its_load_naming_the_extra(tiny_root, catalog, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao imports
    with pytest.raises(ModelLoadError, match=r"torchao, which is not installed here: pip install 'imageserve\[fp8\]'"):
        engine_for(tiny_root, catalog, "z-image-turbo-fp8")
