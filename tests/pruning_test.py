"""Structured pruning: the smaller model computes exactly what the original does with the pruned units and heads
zeroed; the most important units are the ones kept; a pruned workdir evaluates and fine-tunes; bad inputs fail."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5x_lite import evaluation, models, network, prune, pruning, train
from t5x_lite.network import TransformerConfig
from tests import tiny_config
from tests.conftest import REPO_ROOT, cpu_subprocess_env

# The classic Transformer (biases, absolute positions, post-LN) and T5 v1.1 (gated GELU, relative positions).
CLASSIC = TransformerConfig(
    vocab_size=64, d_model=24, num_heads=3, d_ff=40, num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
    use_bias=True, norm_type="layernorm", norm_position="post", position_embedding="sinusoidal", scale_qk=True,
    rescale_logits=False, init_scheme="fairseq",
)  # fmt: skip
GATED = TransformerConfig(
    vocab_size=64, d_model=24, num_heads=2, d_ff=40, num_encoder_layers=2, num_decoder_layers=1, dropout_rate=0.0,
    mlp_activation="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip


def _tokens(seed: int, shape=(2, 9)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 2, 64)


def _logits(cfg: TransformerConfig, params) -> np.ndarray:
    return np.asarray(network.Transformer(cfg).apply({"params": params}, _tokens(1), _tokens(2)))


@pytest.mark.parametrize(
    "cfg, ffn_fraction, heads_fraction",
    [
        (CLASSIC, 0.5, 1 / 3),
        (CLASSIC.replace(scan_layers=True), 0.25, 0.34),  # the scanned layout: 40 -> 30 units, 3 -> 1 head
        (GATED, 0.5, 0.0),  # relative positions: FFN units only
    ],
)
def test_pruned_model_equals_original_with_pruned_units_zeroed(cfg, ffn_fraction, heads_fraction):
    params = network.init_params(cfg, jax.random.key(0))
    pruned, small_cfg = pruning.prune_params(params, cfg, ffn_fraction=ffn_fraction, heads_fraction=heads_fraction)
    assert small_cfg.d_ff == cfg.d_ff - pruning.pruned_count(cfg.d_ff, ffn_fraction, "units")
    assert small_cfg.num_heads == cfg.num_heads - pruning.pruned_count(cfg.num_heads, heads_fraction, "heads")
    assert small_cfg.head_dim == cfg.head_dim
    network.check_params_match(small_cfg, pruned, source="the pruned tree")
    zeroed = pruning.zero_pruned(params, cfg, ffn_fraction=ffn_fraction, heads_fraction=heads_fraction)
    expected = _logits(cfg, zeroed)
    np.testing.assert_allclose(_logits(small_cfg, pruned), expected, rtol=1e-5, atol=1e-5)
    # Zeroing really changed the model (so the equality above is not vacuous).
    assert np.max(np.abs(_logits(cfg, params) - expected)) > 1e-3


def test_the_least_important_units_and_heads_go():
    params = network.init_params(CLASSIC, jax.random.key(0))
    mlp = params["encoder"]["layers_0"]["mlp"]
    weak = [3, 17, 21]
    mlp["wo"]["kernel"] = mlp["wo"]["kernel"].at[np.array(weak)].multiply(1e-3)
    attention = params["decoder"]["layers_1"]["encoder_decoder_attention"]
    attention["out"]["kernel"] = attention["out"]["kernel"].at[2].multiply(1e-3)
    kept = pruning.select_kept(params, CLASSIC, ffn_fraction=3 / 40, heads_fraction=1 / 3)
    encoder_mlp = kept[("encoder", "layers_0", "mlp")]
    assert len(encoder_mlp) == 37 and not set(weak) & set(encoder_mlp.tolist())
    assert kept[("decoder", "layers_1", "encoder_decoder_attention")].tolist() == [0, 1]
    assert len(kept) == 2 * 2 + 2 * 3  # encoder: attention + mlp; decoder: self, cross attention + mlp


def test_bad_fractions_and_models():
    params = network.init_params(GATED, jax.random.key(0))
    with pytest.raises(ValueError, match="head pruning needs absolute positions"):
        pruning.prune_params(params, GATED, ffn_fraction=0.0, heads_fraction=0.5)
    with pytest.raises(ValueError, match="would remove all of them"):
        pruning.prune_params(params, GATED, ffn_fraction=0.99, heads_fraction=0.0)
    with pytest.raises(ValueError, match=r"fraction=1.5 must be in \[0, 1\)"):
        pruning.pruned_count(10, 1.5, "FFN units")
    assert pruning.pruned_count(4, 1 / 3, "heads") == 2  # at least the fraction asked
    assert pruning.pruned_count(2048, 0.5, "units") == 1024


def test_prune_command_then_evaluate_and_fine_tune(tiny_trained, tmp_path):
    workdir, _ = tiny_trained
    out = tmp_path / "pruned"
    command = [sys.executable, "-m", "t5x_lite.prune", "--workdir", workdir, "--out", str(out), "--ffn_fraction", "0.5"]
    options = dict(capture_output=True, text=True, cwd=REPO_ROOT, env=cpu_subprocess_env(), timeout=600)
    run = subprocess.run(command, **options)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "d_ff 64 -> 32" in run.stdout and "--config.model_overrides.d_ff=32" in run.stdout
    record = json.loads((out / "pruning.json").read_text())
    assert record["source_steps"] == [12] and record["params"][1] < record["params"][0]

    loaded = evaluation.load_workdir(str(out))
    assert loaded.model_cfg.d_ff == 32 and loaded.model_cfg.scan_layers
    result = evaluation.evaluate_loaded(loaded, "validation", models.DecodeSettings(), 8, max_examples=8)
    assert result.metrics["examples"] == 8

    # Fine-tuning starts from the pruned weights (init_from) with the smaller shape.
    config = tiny_config.get_config("steps=2")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    config.init_from = str(out)
    config.model_overrides.update(record["model_overrides"])
    train.train_and_evaluate(config, str(tmp_path / "fine_tuned"))
    assert evaluation.load_workdir(str(tmp_path / "fine_tuned")).model_cfg.d_ff == 32

    # Bad inputs: one-line errors with exit status 2, and the pruned checkpoint is untouched.
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    again = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO_ROOT, env=cpu_subprocess_env(), timeout=600
    )
    assert again.returncode == 2 and "already holds checkpoints; choose another --out" in again.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    with pytest.raises(ValueError, match="head pruning needs absolute positions"):
        prune.prune_workdir(workdir, str(tmp_path / "heads"), ffn_fraction=0.0, heads_fraction=0.5)
    with pytest.raises(ValueError, match="nothing to prune"):
        prune.prune_workdir(workdir, str(tmp_path / "none"), ffn_fraction=0.0, heads_fraction=0.0)
