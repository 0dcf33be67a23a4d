"""Parity with transformers' PyTorch T5 and the Hugging Face <-> t5x_lite conversion, both ways."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import convert, network
from t5x_lite.network import Transformer
from t5x_lite.presets import PRESETS, get_model_config, hf_t5_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_BOUND = 1e-4

# Random Hugging Face T5 configs: both T5 generations and every knob the converter must carry across.
HF_CONFIGS = {
    "v1_0_relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1_gated_gelu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1_1_odd_heads_dkv": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_heads=5, d_kv=12),
    "v1_0_buckets_12_distance_20": dict(
        feed_forward_proj="relu",
        relative_attention_num_buckets=12,
        relative_attention_max_distance=20,
        num_heads=3,
        d_kv=7,
    ),
    "v1_1_gated_silu_7_heads": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False, num_heads=7, d_kv=4),
    "v1_0_decoder_deeper": dict(feed_forward_proj="relu", num_layers=1, num_decoder_layers=3, d_kv=16),
}
BASE = dict(vocab_size=211, d_model=48, d_ff=72, num_layers=2, num_heads=4, d_kv=12, dropout_rate=0.0)


def _hf_model(overrides: dict, seed: int = 0):
    """A random transformers T5 model; an untied config gets its own lm_head, as real T5 v1.1 checkpoints have."""
    torch.manual_seed(seed)
    hf_config = transformers.T5Config(**{**BASE, **overrides})
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # HF's default init leaves relative-attention tables small: make the biases matter
        for name, param in model.named_parameters():
            if "relative_attention_bias" in name or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    if overrides.get("tie_word_embeddings") is False:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(hf_config.vocab_size, hf_config.d_model) * 0.05)
    config_dict = hf_config.to_dict()
    config_dict["tie_word_embeddings"] = overrides.get("tie_word_embeddings", True)
    return model, config_dict


def _inputs(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    # 40+ tokens: past max_distance=20 and the exact-bucket range, so log-spaced buckets are exercised.
    encoder = rng.integers(2, vocab, (4, 45))
    encoder[1, 30:] = 0  # padded rows
    encoder[3, 12:] = 0
    decoder = rng.integers(2, vocab, (4, 41))
    decoder[:, 0] = 0
    return encoder, decoder


def _hf_logits(model, encoder, decoder):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(encoder),
            attention_mask=torch.tensor(encoder > 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(decoder),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers(name, scan, record_parity):
    model, hf_config = _hf_model(HF_CONFIGS[name])
    cfg, params = convert.params_from_hf(model.state_dict(), hf_config, scan_layers=scan)
    assert cfg.tie_word_embeddings == (HF_CONFIGS[name].get("tie_word_embeddings") is not False)
    assert cfg.rescale_logits == cfg.tie_word_embeddings
    encoder, decoder = _inputs(cfg.vocab_size, seed=len(name))
    ours = np.asarray(jax.jit(lambda p: Transformer(cfg).apply({"params": p}, encoder, decoder))(params))
    reference = _hf_logits(model, encoder, decoder)
    delta = float(np.abs(ours - reference).max())
    record_parity(f"{name} ({'scanned' if scan else 'unscanned'})", delta, PARITY_BOUND)
    assert delta <= PARITY_BOUND, f"{name}: max |delta| {delta:.3e}"


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_round_trip_to_hf_of_from_hf_is_exact(name):
    model, hf_config = _hf_model(HF_CONFIGS[name], seed=1)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    for scan in (False, True):
        cfg, params = convert.params_from_hf(state_dict, hf_config, scan_layers=scan)
        back = convert.params_to_hf(params, cfg)
        assert set(back) == set(state_dict)
        for key, value in state_dict.items():
            assert back[key].dtype == value.dtype, key
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_cli_from_hf_then_to_hf_loads_in_transformers(tmp_path, record_parity):
    model, hf_config = _hf_model(HF_CONFIGS["v1_1_gated_gelu_untied"], seed=2)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["tie_word_embeddings"] = False  # as in google/t5-v1_1-* config.json files
    (hf_dir / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workdir, out = tmp_path / "converted", tmp_path / "back"
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "t5x_lite.convert", *args], capture_output=True, text=True, env=env
    )
    result = run("from-hf", "--hf_dir", str(hf_dir), "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    assert not (workdir / "vocab").exists() and "no spiece.model" in result.stdout
    again = run("from-hf", "--hf_dir", str(hf_dir), "--workdir", str(workdir))
    assert again.returncode == 2 and "already exists" in again.stderr  # nothing written is overwritten
    result = run("to-hf", "--workdir", str(workdir), "--out", str(out))
    assert result.returncode == 0, result.stderr

    cfg, params = convert.load_converted(str(workdir))
    assert not cfg.tie_word_embeddings and not cfg.rescale_logits
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
    encoder, decoder = _inputs(cfg.vocab_size, seed=3)
    ours = np.asarray(Transformer(cfg).apply({"params": params}, encoder, decoder))
    delta = float(np.abs(ours - _hf_logits(reloaded, encoder, decoder)).max())
    np.testing.assert_array_equal(_hf_logits(reloaded, encoder, decoder), _hf_logits(model, encoder, decoder))
    record_parity("CLI from-hf -> to-hf -> from_pretrained (v1.1)", delta, PARITY_BOUND)
    assert delta <= PARITY_BOUND


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "t5x_lite.convert",
            "from-hf",
            "--hf_dir",
            str(tmp_path / "nope"),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "config.json not found" in result.stderr


def test_d_model_not_matching_a_converted_checkpoint_names_the_field(tmp_path):
    model, hf_config = _hf_model(HF_CONFIGS["v1_0_relu_tied"])
    cfg, params = convert.params_from_hf(model.state_dict(), hf_config)
    convert.save_converted(str(tmp_path / "w"), params, cfg)
    with pytest.raises(ValueError, match=r"^TransformerConfig\.d_model=64 does not match the checkpoint in .*: "):
        convert.load_converted(str(tmp_path / "w"), cfg.replace(d_model=64))
    # The same mismatch at conversion time, from a config.json that disagrees with the arrays.
    with pytest.raises(
        ValueError, match=r"^hf_config d_model=64 does not match the checkpoint: shared.weight has shape"
    ):
        convert.params_from_hf(model.state_dict(), {**hf_config, "d_model": 64})
    with pytest.raises(ValueError, match="feed_forward_proj='gated-mish'"):
        convert.config_from_hf({**hf_config, "feed_forward_proj": "gated-mish", "dense_act_fn": "mish"})
    with pytest.raises(ValueError, match="check num_layers"):
        convert.params_from_hf(model.state_dict(), {**hf_config, "num_layers": 1, "num_decoder_layers": 2})


def test_non_t5_architectures_are_refused_by_to_hf():
    cfg = get_model_config("transformer_tiny", vocab_size=50)
    with pytest.raises(ValueError, match=r"TransformerConfig\.norm_type='layernorm': Hugging Face T5 needs 'rmsnorm'"):
        convert.params_to_hf({}, cfg)


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("t5_") and n != "t5_tiny"))
def test_preset_parameter_count_equals_transformers(name):
    """Counted from shapes on both sides: jax.eval_shape here, PyTorch's meta device there (no 11B allocation)."""
    hf_kwargs = hf_t5_config(name)
    untied = not hf_kwargs.pop("tie_word_embeddings")
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_kwargs))
        if untied:  # transformers 5.x ties lm_head in memory; the published v1.1 checkpoints ship their own
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    hf_count = sum(p.numel() for p in model.parameters())
    assert network.count_params(get_model_config(name)) == hf_count


def test_published_sizes():
    """Exact counts of the published checkpoints (Raffel et al. 2020 round them to 60M, 220M and 770M)."""
    millions = {
        name: network.count_params(get_model_config(name)) / 1e6 for name in ("t5_small", "t5_base", "t5_large")
    }
    assert math.isclose(millions["t5_small"], 60.5, abs_tol=0.1)
    assert math.isclose(millions["t5_base"], 222.9, abs_tol=0.1)
    assert math.isclose(millions["t5_large"], 737.7, abs_tol=0.1)


def test_converted_params_decode_like_teacher_forcing():
    """The decode-mode cache of a converted v1.1 model reproduces its full pass (the decoding issue relies on it)."""
    model, hf_config = _hf_model(HF_CONFIGS["v1_1_odd_heads_dkv"], seed=4)
    cfg, params = convert.params_from_hf(model.state_dict(), hf_config)
    encoder, decoder = _inputs(cfg.vocab_size, seed=5)
    encoder, decoder = jnp.asarray(encoder[:2]), jnp.asarray(decoder[:2, :12])
    full = Transformer(cfg).apply({"params": params}, encoder, decoder)
    encoded = Transformer(cfg).apply({"params": params}, encoder, method=Transformer.encode)
    cache = network.init_decode_cache(cfg, params, encoded, encoder, max_decode_length=12)
    step = jax.jit(lambda c, t: network.decode_step(cfg, params, c, encoded, encoder, t))
    for position in range(12):
        logits, cache = step(cache, decoder[:, position])
        np.testing.assert_allclose(logits, full[:, position], rtol=1e-4, atol=1e-4)


def _spiece(path, pieces: int = 64) -> None:
    """A small SentencePiece model at ``path`` (the ``spiece.model`` of a Hugging Face T5 directory)."""
    import sentencepiece as spm

    words = [f"w{i} x{i % 7} y{i % 13}" for i in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(words),
        model_prefix=str(path)[: -len(".model")],
        vocab_size=pieces,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )


def test_cli_from_hf_writes_the_checkpoints_vocabulary_for_init_from(tmp_path):
    from t5x_lite.data.vocab import Vocabulary

    model, _ = _hf_model(HF_CONFIGS["v1_1_gated_gelu_untied"], seed=2)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    _spiece(hf_dir / "spiece.model")
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "t5x_lite.convert", "from-hf", "--hf_dir", str(hf_dir), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    rows = model.config.vocab_size
    too_many = run("--workdir", str(tmp_path / "bad"), "--extra_ids", str(rows))
    assert too_many.returncode == 2 and "--extra_ids" in too_many.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    result = run("--workdir", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr
    saved = Vocabulary.load(tmp_path / "w" / "vocab")
    expected = Vocabulary(str(hf_dir / "spiece.model"), extra_ids=100)
    assert saved.fingerprint == expected.fingerprint and saved.vocab_size == 164 <= rows
