"""Quantization-aware training with Qwix QT: the QAT forward pass is the PTQ model's, gradients pass straight
through the rounding, a QAT run trains from the config and converts to the PTQ format; bad settings fail early."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from t5x_lite import evaluation, metrics, models, network, quantization, quantize, train
from tests import tiny_config
from tests.conftest import CLASSIC_POST_LN_SINUSOIDAL

BASE = network.TransformerConfig(
    vocab_size=64, d_model=16, num_heads=2, d_ff=24, num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
    **CLASSIC_POST_LN_SINUSOIDAL,
)  # fmt: skip


@pytest.mark.parametrize("scheme", ["int8", "int8_dynamic"])
def test_the_qat_forward_pass_is_the_ptq_model(random_params, scheme):
    params = jax.tree.map(jax.numpy.asarray, random_params(BASE))
    encoder = jax.random.randint(jax.random.key(1), (2, 6), 2, 64)
    decoder = jax.random.randint(jax.random.key(2), (2, 5), 2, 64)
    qat_logits = network.build_model(BASE.replace(qat=scheme)).apply({"params": params}, encoder, decoder)
    ptq_cfg = BASE.replace(quantization=scheme)
    quantized = quantization.quantize_params(params, network.quantized_abstract_params(ptq_cfg))
    ptq_logits = network.build_model(ptq_cfg).apply({"params": quantized}, encoder, decoder)
    float_logits = network.build_model(BASE).apply({"params": params}, encoder, decoder)
    if scheme == "int8":  # the same rounding of the same weights: the same function
        np.testing.assert_allclose(qat_logits, ptq_logits, atol=2e-4, rtol=2e-4)
    else:  # Qwix's QT and PTQ pick activation scales differently; QAT still sits far nearer PTQ than float does
        gap, float_gap = (float(np.max(np.abs(x - ptq_logits))) for x in (qat_logits, float_logits))
        assert gap < 0.5 * float_gap, (gap, float_gap)
    assert float(np.max(np.abs(qat_logits - float_logits))) > 1e-3  # the rounding is really there
    # Straight-through: every weight gets a gradient through its fake-quantized copy.
    grads = jax.grad(
        lambda p: network.build_model(BASE.replace(qat=scheme)).apply({"params": p}, encoder, decoder).sum()
    )(params)
    assert all(float(np.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["encoder"]))


def test_a_qat_run_trains_and_converts_to_the_ptq_format(tmp_path):
    config = tiny_config.get_config("steps=6")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    config.model_overrides.scan_layers = False
    config.quantization = "int8"
    config.log_every_steps = 1
    config.eval_every_steps = 6
    train.train_and_evaluate(config, str(tmp_path / "qat"))
    losses = [row["train/loss"] for row in metrics.read_metrics(str(tmp_path / "qat")) if "train/loss" in row]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    record = quantize.quantize_workdir(str(tmp_path / "qat"), str(tmp_path / "ptq"), "int8")
    assert record["ratio"] < 0.5
    model = json.loads((tmp_path / "ptq" / "config.json").read_text())["model"]
    assert (model["quantization"], model["qat"]) == ("int8", "")  # stored as PTQ, no longer fake-quantized
    settings = models.DecodeSettings(beam_size=1)
    result = evaluation.evaluate_loaded(
        evaluation.load_workdir(str(tmp_path / "ptq")), "validation", settings, 8, max_examples=8
    )
    assert len(result.predictions) == 8


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(qat="int4"), "quantization scheme 'int4' is unknown"),
        (dict(qat="int8", scan_layers=True), "trains the unscanned float model"),
        (dict(qat="int8", lora_rank=2), "trains the unscanned float model"),
    ],
)
def test_bad_qat_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        BASE.replace(**changes)
