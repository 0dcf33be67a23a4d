"""Post-training quantization with Qwix: quantized logits stay close to float, decoding with the cache agrees with
teacher forcing, a quantized workdir round-trips through Orbax and runs in evaluate / infer, bad inputs fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import checkpoints, evaluation, models, network, quantization, quantize, train
from t5x_lite.network import TransformerConfig
from tests import tiny_config
from tests.conftest import REPO_ROOT, cpu_subprocess_env

CFG = TransformerConfig(
    vocab_size=96, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0
)
# Largest |quantized - float| logit, relative to the largest |float| logit, on a random model.
TOLERANCE = {"int8": 0.03, "int8_dynamic": 0.04, "fp8": 0.15}


def _tokens(seed: int, shape=(3, 10)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 2, CFG.vocab_size)


@pytest.fixture(scope="module")
def float_params():
    return network.init_params(CFG, jax.random.key(0))


def _quantized(params, scheme: str, quantize_embeddings: bool = True):
    cfg = CFG.replace(quantization=scheme, quantize_embeddings=quantize_embeddings)
    return cfg, quantization.quantize_params(params, network.quantized_abstract_params(cfg))


@pytest.mark.parametrize("scheme", list(quantization.SCHEMES))
def test_quantized_logits_are_close_to_float(float_params, scheme):
    encoder, decoder = _tokens(1), _tokens(2)
    reference = network.Transformer(CFG).apply({"params": float_params}, encoder, decoder)
    cfg, params = _quantized(float_params, scheme)
    logits = network.build_model(cfg).apply({"params": params}, encoder, decoder)
    error = float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference)))
    assert 0 < error < TOLERANCE[scheme], error  # close, but really quantized


def test_weights_are_int8_with_one_scale_per_output_unit(float_params):
    _, params = _quantized(float_params, "int8")
    stored = quantization.to_storage(params)
    query = stored["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert query["qvalue"].dtype == jnp.int8 and query["qvalue"].shape == (32, 4, 8)
    assert query["scale"].shape == (1, 4, 8)  # per output channel (heads x d_kv), shared along the input axis
    table = stored["token_embedder"]["embedding"]
    assert table["qvalue"].dtype == jnp.int8 and table["scale"].shape == (CFG.vocab_size, 1)  # one scale per row
    # The stored values reconstruct the weights to within half a quantization step.
    kernel = float_params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    restored = quantization.dequantize_params(params)["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert np.all(np.abs(np.asarray(restored - kernel)) <= np.asarray(query["scale"]) / 2 + 1e-7)


def test_keep_embeddings_leaves_the_table_in_float(float_params):
    cfg, params = _quantized(float_params, "int8", quantize_embeddings=False)
    stored = quantization.to_storage(params)
    np.testing.assert_array_equal(stored["token_embedder"]["embedding"], float_params["token_embedder"]["embedding"])
    assert stored["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]["qvalue"].dtype == jnp.int8
    assert quantization.storage_bytes(stored) > quantization.storage_bytes(
        quantization.to_storage(_quantized(float_params, "int8")[1])
    )


@pytest.mark.parametrize("scheme", ["int8", "int8_dynamic"])
def test_cached_decoding_matches_teacher_forcing(float_params, scheme):
    """The decode path (encode, cache, one step at a time) runs the same quantized matmuls as teacher forcing."""
    cfg, params = _quantized(float_params, scheme)
    encoder = _tokens(3)
    tokens, _ = models.predict_batch(cfg, params, encoder, max_decode_length=6)
    assert tokens.shape == (3, 6)
    decoder_inputs = jnp.concatenate([jnp.zeros((3, 1), tokens.dtype), tokens[:, :-1]], axis=1)
    logits = network.build_model(cfg).apply({"params": params}, encoder, decoder_inputs)
    greedy = jnp.argmax(logits, axis=-1)
    alive = jnp.cumsum(tokens == 1, axis=1) - (tokens == 1) == 0  # up to and including the first EOS
    np.testing.assert_array_equal(np.where(alive, greedy, 0), np.where(alive, tokens, 0))
    beams, _ = models.predict_batch(cfg, params, encoder, models.DecodeSettings(beam_size=3), max_decode_length=6)
    assert beams.shape == (3, 6)


def test_storage_round_trip_and_mismatch_errors(float_params):
    cfg, params = _quantized(float_params, "int8")
    abstract = network.quantized_abstract_params(cfg)
    stored = jax.tree.map(np.asarray, quantization.to_storage(params))
    back = quantization.from_storage(stored, abstract)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    other = jax.tree.map(np.asarray, quantization.to_storage(_quantized(float_params, "fp8")[1]))
    with pytest.raises(ValueError, match=r"stored float8_e4m3fn\[.*\], the model expects int8"):
        quantization.from_storage(other, abstract)
    del stored["decoder"]["decoder_norm"]
    with pytest.raises(ValueError, match="no parameter 'decoder/decoder_norm/scale'"):
        quantization.from_storage(stored, abstract)


def test_stacked_storage_holds_fewer_arrays_and_applies_the_same(float_params):
    """t5x_lite.quantize saves each stack's layers stacked (one array per weight kind, less Orbax metadata); the
    model applies it exactly like the per-layer storage, which older quantized workdirs hold."""
    cfg, params = _quantized(float_params, "int8")
    per_layer = quantization.to_storage(params)
    stacked = network.quantized_for_disk(cfg, params)
    assert (
        "layers_0" not in stacked["encoder"]
        and stacked["decoder"]["layers"]["mlp"]["wi"]["kernel"]["qvalue"].shape[0] == 2
    )
    assert len(jax.tree.leaves(stacked)) < len(jax.tree.leaves(per_layer))
    from_stacked, from_per_layer = network.runtime_params(cfg, stacked), network.runtime_params(cfg, per_layer)
    assert jax.tree.structure(from_stacked) == jax.tree.structure(params)
    for a, b, c in zip(
        jax.tree.leaves(from_stacked), jax.tree.leaves(from_per_layer), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_bad_configs():
    with pytest.raises(ValueError, match="quantization scheme 'int4' is unknown; choose one of int8, int8_dynamic"):
        CFG.replace(quantization="int4")
    with pytest.raises(ValueError, match="not supported with scan_layers=True"):
        CFG.replace(quantization="int8", scan_layers=True)


# ------------------------------------------------------------------------------------------- quantized workdirs
@pytest.fixture
def trained(tiny_trained):
    return tiny_trained[0]  # scanned layers: quantize stores the unscanned layout


def test_quantized_workdir_round_trips_and_evaluates(trained, tmp_path):
    out = str(tmp_path / "int8")
    record = quantize.quantize_workdir(trained, out, "int8")
    # d_model=32: a float32 scale per 32 int8 values adds 1/8, and the norms and position biases stay float.
    assert record["source_steps"] == [12] and 0.25 < record["ratio"] < 0.5, record
    saved = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert saved["model"]["quantization"] == "int8" and saved["model"]["scan_layers"] is False

    float_model = evaluation.load_workdir(trained)
    quantized_model = evaluation.load_workdir(out)
    assert quantized_model.steps == [12] and quantized_model.model_cfg.quantization == "int8"
    # load_params returns the same Qwix tree that quantizing in memory gives.
    expected = quantization.quantize_params(
        network.unscan_params(float_model.params, float_model.model_cfg),
        network.quantized_abstract_params(quantized_model.model_cfg),
    )
    reader = checkpoints.Checkpointer(out, save_every_steps=1, async_save=False, read_only=True)
    on_disk = reader.state_metadata(12)["params"]
    reader.close()
    assert "layers_0" not in on_disk["encoder"] and "layers" in on_disk["encoder"], sorted(on_disk["encoder"])
    loaded = checkpoints.load_params(out)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)

    settings = models.DecodeSettings()
    float_result = evaluation.evaluate_loaded(float_model, "validation", settings, 8, max_examples=16)
    quantized_result = evaluation.evaluate_loaded(quantized_model, "validation", settings, 8, max_examples=16)
    assert quantized_result.metrics["examples"] == 16
    # A weight-only int8 copy of a model decodes (nearly) the same outputs.
    same = np.mean([a == b for a, b in zip(float_result.predictions, quantized_result.predictions, strict=True)])
    assert same >= 0.75, same


def test_quantize_command_then_infer(trained, tmp_path, capsys):
    out = tmp_path / "dyn"
    env = cpu_subprocess_env()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "t5x_lite.quantize",
            "--workdir",
            trained,
            "--out",
            str(out),
            "--scheme",
            "int8_dynamic",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "int8_dynamic:" in run.stdout and "parameter bytes" in run.stdout
    infer = subprocess.run(
        [sys.executable, "-m", "t5x_lite.infer", "--workdir", str(out)],
        input="one two three\nfour\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=600,
    )
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert len(infer.stdout.splitlines()) == 2

    # Bad inputs: clear errors, and the existing quantized checkpoint is untouched.
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match="already holds checkpoints; choose another --out"):
        quantize.quantize_workdir(trained, str(out), "int8")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    with pytest.raises(ValueError, match="is already quantized"):
        quantize.quantize_workdir(str(out), str(tmp_path / "twice"), "int8")
    with pytest.raises(ValueError, match="is the source workdir"):
        quantize.quantize_workdir(trained, trained, "int8")
    with pytest.raises(ValueError, match="average the float checkpoints before quantizing"):
        evaluation.load_workdir(str(out), average_last=2)
    # ... and the command says so in one line with exit status 2, no traceback.
    assert quantize.main(["--workdir", trained, "--out", str(out)]) == 2
    assert quantize.main(["--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors), errors
    assert "already holds checkpoints" in errors[0] and "missing" in errors[1]


def test_training_a_quantized_config_says_to_quantize_after_training(tmp_path):
    config = tiny_config.get_config("steps=2")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    config.model_overrides.update(quantization="int8", scan_layers=False)
    with pytest.raises(ValueError, match="post-training only: train in float, then run python -m t5x_lite.quantize"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
