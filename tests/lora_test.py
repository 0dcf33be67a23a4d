"""LoRA through Qwix: zero-init adapters leave the model unchanged, merging reproduces the adapted model, training
moves the adapters only (no optimizer state for the base), init_from fills the base, bad settings fail early."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import (
    checkpoints,
    evaluation,
    lora,
    lora_merge,
    metrics,
    models,
    network,
    partitioning,
    quantization,
    quantize,
    train,
    trainer,
)
from t5x_lite.data import pipeline
from t5x_lite.data.tasks import TaskRegistry
from t5x_lite.data.vocab import Vocabulary
from tests import tiny_config
from tests.conftest import CLASSIC_POST_LN_SINUSOIDAL

BASE = network.TransformerConfig(
    vocab_size=64, d_model=16, num_heads=2, d_ff=24, num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
    **CLASSIC_POST_LN_SINUSOIDAL,
)  # fmt: skip


def _tokens(seed: int, shape=(2, 6)):
    return jax.random.randint(jax.random.key(seed), shape, 2, BASE.vocab_size)


def _batch(seed: int, shape=(4, 6)):
    """A teacher-forced train batch of random tokens (targets = inputs, shifted right for the decoder)."""
    tokens = _tokens(seed, shape)
    return {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": jnp.pad(tokens[:, :-1], ((0, 0), (1, 0))),
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": jnp.ones(shape, jnp.float32),
    }


def _with_random_adapters(params, scale: float = 0.3):
    """Adapters drawn at random (B nonzero), so that the adapted model differs from the base."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(jax.random.key(11), len(leaves)))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: scale * jax.random.normal(next(keys), leaf.shape) if lora.is_adapter(path) else leaf,
        params,
    )


def test_zero_init_adapters_equal_the_base_model_and_merging_equals_the_adapted_one(random_params):
    base = random_params(BASE)
    adapted_cfg = BASE.replace(lora_rank=3, lora_alpha=6.0)
    fresh = lora.insert_base(network.init_params(adapted_cfg, jax.random.key(0)), base)
    encoder, decoder = _tokens(1), _tokens(2)
    expected = network.build_model(BASE).apply({"params": base}, encoder, decoder)
    got = network.build_model(adapted_cfg).apply({"params": fresh}, encoder, decoder)
    np.testing.assert_array_equal(got, expected)  # B = 0: exactly the base model
    # One adapter pair per attention projection and MLP matrix; none on the token table.
    names = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]]
    adapted = sorted({name.rsplit("_lora_", 1)[0] for name in names if "_lora_" in name})
    assert len(adapted) == 4 + 8 + 2 * 2 and not any("embed" in name for name in adapted)
    assert lora.count_adapter_params(fresh) == 3 * sum(
        shape for shape in (16 + 16,) * 12 + (16 + 24,) * 4
    )  # rank x (in + out) for 12 attention and 4 MLP matrices

    trained = _with_random_adapters(fresh)
    adapted_out = network.build_model(adapted_cfg).apply({"params": trained}, encoder, decoder)
    assert float(jnp.max(jnp.abs(adapted_out - expected))) > 1e-2
    merged = lora.merge(trained, adapted_cfg.lora_rank, adapted_cfg.lora_alpha)
    network.check_params_match(BASE, merged)
    merged_out = network.build_model(BASE).apply({"params": merged}, encoder, decoder)
    np.testing.assert_allclose(merged_out, adapted_out, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("share_embeddings", [True, False])
def test_an_output_adapter_changes_the_logits_not_the_input_embeddings_and_merges_untied(
    random_params, share_embeddings
):
    base_cfg = BASE.replace(share_embeddings=share_embeddings)
    base = random_params(base_cfg)
    adapted_cfg = base_cfg.replace(lora_rank=2, lora_output=True)
    fresh = lora.insert_base(network.init_params(adapted_cfg, jax.random.key(0)), base)
    table = fresh["token_embedder"] if share_embeddings else fresh["decoder"]["token_embedder"]
    assert table["embedding_lora_a"].shape == (16, 2) and table["embedding_lora_b"].shape == (2, 64)
    encoder, decoder = _tokens(1), _tokens(2)
    expected = network.build_model(base_cfg).apply({"params": base}, encoder, decoder)
    np.testing.assert_array_equal(network.build_model(adapted_cfg).apply({"params": fresh}, encoder, decoder), expected)
    assert network.output_projection(adapted_cfg, fresh) is None  # decoding and the loss go through the adapter

    # Only the output adapter nonzero: the encoder (which reads the same table) computes exactly what it did.
    only_output = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 0.5 if "embedding_lora_b" in jax.tree_util.keystr(path) else leaf, fresh
    )
    encode = lambda cfg, params: network.build_model(cfg).apply({"params": params}, encoder, method="encode")  # noqa: E731
    np.testing.assert_array_equal(encode(adapted_cfg, only_output), encode(base_cfg, base))
    trained = _with_random_adapters(fresh)
    adapted_out = network.build_model(adapted_cfg).apply({"params": trained}, encoder, decoder)
    untied, was_tied = lora.untie_output_adapter(trained, 2)
    merged = lora.merge(untied, 2)
    merged_cfg = base_cfg.replace(tie_word_embeddings=False)
    assert was_tied
    network.check_params_match(merged_cfg, merged)
    merged_out = network.build_model(merged_cfg).apply({"params": merged}, encoder, decoder)
    np.testing.assert_allclose(merged_out, adapted_out, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("share_embeddings", [True, False])
def test_a_table_adapter_moves_lookups_and_logits_alike_and_merges_into_the_tied_table(random_params, share_embeddings):
    base_cfg = BASE.replace(share_embeddings=share_embeddings)
    base = random_params(base_cfg)
    adapted_cfg = base_cfg.replace(lora_rank=2, lora_alpha=3.0, lora_embed=True)
    fresh = lora.insert_base(network.init_params(adapted_cfg, jax.random.key(0)), base)
    tables = (
        [fresh["token_embedder"]] if share_embeddings else [fresh[s]["token_embedder"] for s in ("encoder", "decoder")]
    )
    for table in tables:  # A [vocab, rank] at zero, B [rank, d_model]
        assert table["embedding_lora_a"].shape == (16 * 4, 2) and table["embedding_lora_b"].shape == (2, 16)
        assert not np.any(table["embedding_lora_a"]) and np.any(table["embedding_lora_b"])
    encoder, decoder = _tokens(1), _tokens(2)
    expected = network.build_model(base_cfg).apply({"params": base}, encoder, decoder)
    np.testing.assert_array_equal(network.build_model(adapted_cfg).apply({"params": fresh}, encoder, decoder), expected)

    trained = _with_random_adapters(fresh)
    model = network.build_model(adapted_cfg)
    adapted_out = model.apply({"params": trained}, encoder, decoder)
    encode = lambda cfg, params: network.build_model(cfg).apply({"params": params}, encoder, method="encode")  # noqa: E731
    assert float(jnp.max(jnp.abs(encode(adapted_cfg, trained) - encode(base_cfg, base)))) > 1e-2  # lookups moved
    # The fused loss's projection is the adapted table: hidden states times it give the model's logits.
    hidden = model.apply({"params": trained}, encoder, decoder, return_hidden=True)
    projected = hidden @ network.output_projection(adapted_cfg, trained)
    np.testing.assert_allclose(projected, adapted_out, atol=2e-5, rtol=2e-5)
    # Merging folds A @ B * alpha / rank into each table; the merged model stays tied and computes the same.
    merged = lora.merge(trained, 2, 3.0)
    network.check_params_match(base_cfg, merged)
    np.testing.assert_allclose(
        network.build_model(base_cfg).apply({"params": merged}, encoder, decoder), adapted_out, atol=2e-5, rtol=2e-5
    )


@pytest.mark.parametrize("share_embeddings", [True, False])
def test_trainable_rows_change_their_rows_only_in_lookups_and_logits_and_merge_into_the_table(
    random_params, share_embeddings
):
    base_cfg = BASE.replace(share_embeddings=share_embeddings)
    base = random_params(base_cfg)
    rows = (3, 7, 40, 63)
    adapted_cfg = base_cfg.replace(lora_rank=2, lora_rows=rows)
    fresh = lora.insert_base(network.init_params(adapted_cfg, jax.random.key(0)), base)
    tables = (
        [fresh["token_embedder"]] if share_embeddings else [fresh[s]["token_embedder"] for s in ("encoder", "decoder")]
    )
    assert all(
        table["embedding_lora_rows"].shape == (4, 16) and not np.any(table["embedding_lora_rows"]) for table in tables
    )
    # rank 2 on 16 matrices, plus 4 rows of 16 per table; the row ids are config, not parameters
    assert lora.count_adapter_params(fresh) == lora.count_adapter_params(
        network.init_params(base_cfg.replace(lora_rank=2), jax.random.key(0))
    ) + 4 * 16 * len(tables)
    encoder, decoder = jnp.array([[3, 5, 7, 2, 9, 1]]), jnp.array([[0, 40, 6, 63, 8, 1]])
    expected = network.build_model(base_cfg).apply({"params": base}, encoder, decoder)
    np.testing.assert_array_equal(network.build_model(adapted_cfg).apply({"params": fresh}, encoder, decoder), expected)

    trained = _with_random_adapters(fresh)
    model = network.build_model(adapted_cfg)
    adapted_out = model.apply({"params": trained}, encoder, decoder)
    # The fused loss's projection is the changed table: hidden states times it give the model's logits.
    hidden = model.apply({"params": trained}, encoder, decoder, return_hidden=True)
    np.testing.assert_allclose(
        hidden @ network.output_projection(adapted_cfg, trained), adapted_out, atol=2e-5, rtol=2e-5
    )
    # Merging adds the changes to their rows: the other rows stay the base's, and the merged model computes the same.
    merged = lora.merge(trained, 2, None, rows)
    network.check_params_match(base_cfg, merged)
    for where in ["token_embedder"] if share_embeddings else ["encoder", "decoder"]:
        new_table = (merged if share_embeddings else merged[where])["token_embedder"]["embedding"]
        old_table = (base if share_embeddings else base[where])["token_embedder"]["embedding"]
        moved = np.flatnonzero(np.any(np.asarray(new_table) != np.asarray(old_table), axis=1))
        assert tuple(moved) == rows
    np.testing.assert_allclose(
        network.build_model(base_cfg).apply({"params": merged}, encoder, decoder), adapted_out, atol=2e-5, rtol=2e-5
    )
    with pytest.raises(ValueError, match=r"trainable rows \[4, 16\] do not fit the table \[64, 16\] and lora_rows"):
        lora.merge(trained, 2, None, rows[:3])
    # The row ids survive config.json (a JSON list) as a tuple: a hashable config, the same model
    assert network.TransformerConfig.from_dict(json.loads(json.dumps(adapted_cfg.to_dict()))) == adapted_cfg


def test_trainable_rows_and_b_factors_take_their_own_learning_rates_and_the_base_none(random_params):
    cfg = BASE.replace(lora_rank=2, lora_rows=(4, 9))
    params = lora.insert_base(network.init_params(cfg, jax.random.key(0)), random_params(BASE))
    grads = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.5, leaf.dtype), params)

    def first_update(rows_scale, b_scale=1.0):
        optimizer = lora.adapters_only(optax.adam(1e-2), rows_scale, b_scale)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return {
            jax.tree_util.keystr(path): np.asarray(u) for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]
        }

    same, scaled, b_faster = first_update(1.0), first_update(0.25), first_update(1.0, 16.0)
    assert sum(name.endswith("_lora_b']") for name in same) >= 4
    for name, update in same.items():
        if name.endswith("['embedding_lora_rows']"):
            np.testing.assert_allclose(scaled[name], 0.25 * update, rtol=1e-6)
            np.testing.assert_array_equal(b_faster[name], update)
            assert np.all(update != 0)
        elif name.endswith("_lora_b']"):  # LoRA+: B at 16x the learning rate, A and the rows as they were
            np.testing.assert_array_equal(scaled[name], update)
            np.testing.assert_allclose(b_faster[name], 16.0 * update, rtol=1e-6)
            assert np.all(update != 0)
        elif "_lora_" in name:
            np.testing.assert_array_equal(scaled[name], update)  # the adapters keep the learning rate
            np.testing.assert_array_equal(b_faster[name], update)
        else:  # the base never moves
            assert not np.any(scaled[name]) and not np.any(update) and not np.any(b_faster[name])


def test_a_qlora_table_adapter_is_applied_in_float_with_no_adapter_of_its_own(random_params):
    ptq_cfg = BASE.replace(quantization="int8")
    qlora_cfg = ptq_cfg.replace(lora_rank=2, lora_embed=True)
    base = jax.tree.map(jnp.asarray, random_params(BASE))
    quantized = quantization.quantize_params(base, network.quantized_abstract_params(ptq_cfg))
    params = lora.insert_base(network.init_params(qlora_cfg, jax.random.key(0)), quantization.to_storage(quantized))
    names = sorted(name for name in _stored(params) if "_lora_" in name and "token_embedder" in name)
    assert [name.rsplit("'", 2)[-2] for name in names] == ["embedding_lora_a", "embedding_lora_b"]  # nothing nested
    trained = _with_random_adapters(params)
    encoder, decoder = _tokens(1), _tokens(2)
    got = network.build_model(qlora_cfg).apply({"params": network.runtime_params(qlora_cfg, trained)}, encoder, decoder)
    # The float model with the same adapters on the dequantized base: int8 weight-only computes x @ (q * scale), so
    # only float rounding separates them -- unless the adapter's own matmuls were quantized (errors ~1e-2).
    float_cfg = BASE.replace(lora_rank=2, lora_embed=True)
    dequantized = quantization.dequantize_params(network.runtime_params(qlora_cfg, trained))
    expected = network.build_model(float_cfg).apply({"params": dequantized}, encoder, decoder)
    ptq_out = network.build_model(ptq_cfg).apply({"params": quantized}, encoder, decoder)
    assert float(jnp.max(jnp.abs(got - ptq_out))) > 1e-2  # the adapters act
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_a_train_step_moves_the_adapters_only_and_keeps_no_state_for_the_base(random_params):
    cfg = BASE.replace(lora_rank=2)
    params = _with_random_adapters(lora.insert_base(network.init_params(cfg, jax.random.key(0)), random_params(BASE)))
    optimizer = lora.adapters_only(optax.adam(1e-2))
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    adam_numbers = sum(np.size(leaf) for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf))
    assert adam_numbers == 2 * lora.count_adapter_params(params)  # mu and nu of the adapters, nothing else
    batch = _batch(3, (4, 6))
    new, step_metrics = trainer.train_step(state, batch, jax.random.key(0), model_cfg=cfg, optimizer=optimizer)
    assert np.isfinite(float(step_metrics["loss"]))
    changed = {
        jax.tree_util.keystr(path): not np.array_equal(before, after)
        for (path, before), after in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new.params), strict=True
        )
    }
    assert all(moved == ("_lora_" in name) for name, moved in changed.items())


def test_the_cpu_lora_step_with_ynnpack_elementwise_fusions_equals_the_default_compiled_one(random_params):
    """compile_train_step gives a LoRA step on a CPU its own XLA option (trainer.train_compiler_options, a speed fix):
    the step so compiled updates the adapters as the step compiled with XLA's defaults does."""
    cfg = BASE.replace(lora_rank=2, dropout_rate=0.1, dropout_generator="hash", num_encoder_layers=2)
    base_cfg = cfg.replace(lora_rank=0)
    mesh = partitioning.make_mesh((-1, 1, 1))
    assert trainer.train_compiler_options(cfg, mesh) == trainer.YNN_ELEMENTWISE
    assert trainer.train_compiler_options(base_cfg, mesh) is None  # full fine-tuning keeps XLA's defaults
    # an option this jaxlib does not know (a renamed experimental flag) falls back to the defaults
    assert not trainer._xla_accepts((("xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_FUSION_TYPE"),))
    base = random_params(base_cfg)
    params = _with_random_adapters(lora.insert_base(network.init_params(cfg, jax.random.key(0)), base))
    optimizer = lora.adapters_only(optax.adam(1e-2))
    batch = _batch(5, (7, 12))  # neither dimension a power of two: the shapes where the defaults fused badly

    def state():  # a fresh copy each time: the compiled step donates the state passed in
        fresh = jax.tree.map(jnp.copy, params)
        return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=fresh, opt_state=optimizer.init(fresh))

    step = trainer.compile_train_step(cfg, optimizer, mesh, "data_parallel", label_smoothing=0.1, loss_chunk_tokens=32)
    with partitioning.activate(mesh, "data_parallel"):
        new, metrics = step(state(), batch, jax.random.key(1))
    plain = jax.jit(
        functools.partial(
            trainer.train_step, model_cfg=cfg, optimizer=optimizer, label_smoothing=0.1, loss_chunk_tokens=32
        )
    )
    reference, reference_metrics = plain(state(), batch, jax.random.key(1))
    np.testing.assert_allclose(float(metrics["loss"]), float(reference_metrics["loss"]), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(reference.params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def _unscanned(steps: int, tmp_path):
    config = tiny_config.get_config(f"steps={steps}")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    config.model_overrides.scan_layers = False
    config.eval_every_steps = steps
    return config


@pytest.mark.parametrize("table_change", ["none", "lora_embed", "lora_rows"])
def test_lora_fine_tuning_from_a_base_workdir_then_merge(tmp_path, table_change):
    base_dir, lora_dir, merged_dir = (str(tmp_path / name) for name in ("base", "lora", "merged"))
    train.train_and_evaluate(_unscanned(6, tmp_path), base_dir)
    config = _unscanned(6, tmp_path)
    config.init_from = base_dir
    config.model_overrides.lora_rank = 2
    config.model_overrides.lora_embed = table_change == "lora_embed"
    config.lora_rows = 5 if table_change == "lora_rows" else 0
    config.learning_rate = 3e-2
    config.log_every_steps = 1
    train.train_and_evaluate(config, lora_dir)
    base, tuned = checkpoints.load_params(base_dir), checkpoints.load_params(lora_dir)
    for path, value in jax.tree_util.tree_flatten_with_path(tuned)[0]:
        if lora.is_adapter(path):
            continue
        reference = base
        for key in path:
            reference = reference[key.key]
        np.testing.assert_array_equal(value, reference)  # the base weights never moved
    assert lora.holds_adapters(tuned)
    losses = [row["train/loss"] for row in metrics.read_metrics(lora_dir) if "train/loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0]

    record = lora_merge.merge_workdir(lora_dir, merged_dir)
    assert record["lora_rank"] == 2 and record["adapter_params"] == lora.count_adapter_params(tuned)
    merged = checkpoints.load_params(merged_dir)
    assert not lora.holds_adapters(merged)
    tables = [
        (merged[s]["token_embedder"], base[s]["token_embedder"])
        for s in ("encoder", "decoder")
        if "token_embedder" in merged[s]
    ]
    tables += [(merged["token_embedder"], base["token_embedder"])] if "token_embedder" in merged else []
    assert tables and all(
        np.array_equal(new["embedding"], old["embedding"]) == (table_change == "none") for new, old in tables
    )  # a table adapter or trainable rows are folded into the table; without them the table is the base's
    if table_change == "lora_rows":  # the 5 most frequent target tokens of the training split, and only they, moved
        saved = json.loads((tmp_path / "lora" / "config.json").read_text())
        chosen = network.TransformerConfig.from_dict(saved["model"]).lora_rows
        vocab = Vocabulary.load(os.path.join(lora_dir, "vocab"))
        assert chosen == pipeline.most_frequent_tokens(TaskRegistry.get(config.task), vocab, 5) and len(chosen) == 5
        for new, old in tables:
            assert tuple(np.flatnonzero(np.any(new["embedding"] != old["embedding"], axis=1))) == chosen
    # The checkpoints hold the adapters (and their optimizer state) only; load_params and resume add the base.
    saved = checkpoints.Checkpointer(lora_dir, save_every_steps=1, read_only=True)
    saved_params = saved.state_metadata()["params"]
    saved.close()
    assert lora.holds_adapters_only(saved_params)
    config.num_train_steps = 7
    train.train_and_evaluate(config, lora_dir)
    assert [row["step"] for row in metrics.read_metrics(lora_dir) if "train/loss" in row][-1] == 7
    os.rename(base_dir, base_dir + "_moved")  # without its base a LoRA run cannot be read: a clear error
    with pytest.raises(FileNotFoundError, match="holds LoRA adapters only; their base model, init_from=.*base'"):
        checkpoints.load_params(lora_dir)
    os.rename(base_dir + "_moved", base_dir)

    assert lora_merge.main(["--workdir", base_dir, "--out", str(tmp_path / "x")]) == 2  # not a LoRA run
    assert lora_merge.main(["--workdir", lora_dir, "--out", lora_dir]) == 2  # into itself


def test_most_frequent_tokens_counts_the_split_and_lora_rows_needs_lora(tmp_path):
    config = _unscanned(2, tmp_path)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    task, vocab = TaskRegistry.get(config.task), Vocabulary.load(str(tmp_path / "run" / "vocab"))
    counts = np.zeros(vocab.vocab_size, np.int64)
    source = task.get_source("train")  # generated, endless: the first 2,000 examples
    for index in range(2000):
        np.add.at(counts, task.tokenize(source[index], vocab)["targets"], 1)
    chosen = pipeline.most_frequent_tokens(task, vocab, 7, max_examples=2000)
    assert len(chosen) == 7 and list(chosen) == sorted(chosen)
    assert counts[list(chosen)].min() >= np.delete(counts, list(chosen)).max()  # no token left out is more frequent
    every = pipeline.most_frequent_tokens(task, vocab, vocab.vocab_size + 5, max_examples=2000)  # those that occur
    assert every == tuple(int(i) for i in np.flatnonzero(counts))
    with pytest.raises(ValueError, match="count=0 must be at least 1"):
        pipeline.most_frequent_tokens(task, vocab, 0)
    config.lora_rows = 3  # without lora_rank: refused before any step
    with pytest.raises(ValueError, match="lora_rows=3 must be a non-negative integer, with model_overrides.lora_rank"):
        train.train_and_evaluate(config, str(tmp_path / "rows"))
    config.lora_rows, config.lora_b_lr = 0, 0.01  # LoRA+'s B learning rate without adapters: refused too
    with pytest.raises(
        ValueError, match="lora_b_lr=0.01 must be a non-negative number .* needs model_overrides.lora_rank"
    ):
        train.train_and_evaluate(config, str(tmp_path / "b"))


def _stored(params):
    """Path -> array of a stored (plain dict) parameter tree."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def test_qlora_zero_adapters_equal_the_quantized_base_and_a_step_moves_the_adapters_only(random_params):
    ptq_cfg, qlora_cfg = BASE.replace(quantization="int8"), BASE.replace(quantization="int8", lora_rank=2)
    base = jax.tree.map(jnp.asarray, random_params(BASE))
    quantized = quantization.quantize_params(base, network.quantized_abstract_params(ptq_cfg))
    params = lora.insert_base(network.init_params(qlora_cfg, jax.random.key(0)), quantization.to_storage(quantized))
    # The base is held as int8 values and their scales (a quarter of the float bytes), the adapters in float.
    dtypes = {name.rsplit("'", 2)[-2]: leaf.dtype for name, leaf in _stored(params).items()}
    assert dtypes["qvalue"] == np.int8 and dtypes["kernel_lora_a"] == dtypes["kernel_lora_b"] == np.float32
    encoder, decoder = _tokens(1), _tokens(2)
    expected = network.build_model(ptq_cfg).apply({"params": quantized}, encoder, decoder)
    got = network.build_model(qlora_cfg).apply({"params": network.runtime_params(qlora_cfg, params)}, encoder, decoder)
    np.testing.assert_array_equal(got, expected)  # B = 0: exactly the PTQ model of the base

    optimizer = lora.adapters_only(optax.adam(1e-2))
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    batch = _batch(3, (4, 6))
    losses = []
    for _ in range(3):
        state, step_metrics = trainer.train_step(
            state, batch, jax.random.key(0), model_cfg=qlora_cfg, optimizer=optimizer
        )
        losses.append(float(step_metrics["loss"]))
    assert losses[-1] < losses[0]
    before, after = _stored(params), _stored(state.params)
    moved = {name: not np.array_equal(before[name], after[name]) for name in before}
    assert all(change == ("_lora_" in name) for name, change in moved.items())  # int8 base and scales stay put
    assert sum(np.size(leaf) for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf)) == 2 * sum(
        np.size(value) for name, value in before.items() if "_lora_" in name
    )


def test_qlora_from_a_float_base_workdir_then_evaluate_resume_and_merge(tmp_path):
    base_dir, qlora_dir, merged_dir = (str(tmp_path / name) for name in ("base", "qlora", "merged"))
    train.train_and_evaluate(_unscanned(6, tmp_path), base_dir)
    config = _unscanned(6, tmp_path)
    config.init_from = base_dir
    config.model_overrides.lora_rank = 2
    config.quantization = "int8"  # with lora_rank: QLoRA (without it, quantization-aware training)
    config.learning_rate = 3e-2
    config.log_every_steps = 1
    train.train_and_evaluate(config, qlora_dir)
    loaded = evaluation.load_workdir(qlora_dir)
    assert loaded.model_cfg.quantization == "int8" and loaded.model_cfg.lora_rank == 2 and not loaded.model_cfg.qat
    # The checkpoint holds the base as PTQ quantizes the float base, untouched by training, and the adapters.
    base_cfg = network.without_lora(loaded.model_cfg)
    quantized_base = quantization.quantize_params(
        checkpoints.load_params(base_dir), network.quantized_abstract_params(base_cfg)
    )
    stored, expected = _stored(quantization.to_storage(loaded.params)), _stored(quantization.to_storage(quantized_base))
    assert all(np.array_equal(stored[name], value) for name, value in expected.items())
    assert {name for name in stored if name not in expected} == {name for name in stored if "_lora_" in name}
    kernels = [value for name, value in stored.items() if name.endswith("['kernel']['qvalue']")]
    assert len(kernels) >= 10 and all(kernel.dtype == np.int8 for kernel in kernels)
    losses = [row["train/loss"] for row in metrics.read_metrics(qlora_dir) if "train/loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0]
    result = evaluation.evaluate_loaded(loaded, split="validation", settings=models.DecodeSettings(), batch_size=4)
    assert len(result.predictions) > 0

    config.num_train_steps = 7  # resume: base and adapters come back from the checkpoint
    train.train_and_evaluate(config, qlora_dir)
    assert [row["step"] for row in metrics.read_metrics(qlora_dir) if "train/loss" in row][-1] == 7

    lora_merge.merge_workdir(qlora_dir, merged_dir)
    merged = evaluation.load_workdir(merged_dir)
    assert merged.model_cfg.quantization == "" and merged.model_cfg.lora_rank == 0
    resumed = evaluation.load_workdir(qlora_dir)
    encoder, decoder = _tokens(1, (2, 6)) % 30 + 2, _tokens(2, (2, 6)) % 30 + 2
    adapted = network.build_model(resumed.model_cfg).apply({"params": resumed.params}, encoder, decoder)
    folded = network.build_model(merged.model_cfg).apply({"params": merged.params}, encoder, decoder)
    np.testing.assert_allclose(folded, adapted, atol=1e-4, rtol=1e-4)  # merged = dequantized base + A @ B


def test_qlora_refuses_a_base_quantized_with_another_scheme(tmp_path):
    base_dir = str(tmp_path / "base")
    train.train_and_evaluate(_unscanned(2, tmp_path), base_dir)
    quantize.quantize_workdir(base_dir, str(tmp_path / "base_fp8"), scheme="fp8")
    config = _unscanned(2, tmp_path)
    config.init_from = str(tmp_path / "base_fp8")
    config.model_overrides.lora_rank = 2
    config.quantization = "int8"
    with pytest.raises(ValueError, match="is quantized to float8_e4m3fn; --config.quantization=int8 needs int8"):
        train.train_and_evaluate(config, str(tmp_path / "qlora"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lora_rank=-1), "lora_rank=-1 must be a non-negative integer"),
        (dict(lora_rank=2, lora_alpha=0.0), "lora_alpha=0.0 must be positive"),
        (dict(lora_rank=2, scan_layers=True), "adapters need the unscanned model"),
        (dict(lora_rank=2, quantization="int4"), "quantization scheme 'int4' is unknown"),
        (dict(lora_output=True), "set lora_rank > 0 too"),
        (dict(lora_embed=True), "set lora_rank > 0 too"),
        (dict(lora_rank=2, lora_embed=True, lora_output=True), "already adapts the output projection"),
        (dict(lora_rows=(1, 2)), "lora_rows=\\(1, 2\\).*set lora_rank > 0 too"),
        (dict(lora_rank=2, lora_rows=(1, 64)), "must be token ids in \\[0, vocab_size=64\\)"),
        (dict(lora_rank=2, lora_rows=(5, 5)), "names a row twice"),
        (dict(lora_rank=2, lora_rows=(5,), lora_output=True), "lora_rows already adapt the output projection"),
    ],
)
def test_bad_lora_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        BASE.replace(**changes)


def test_merge_refuses_factors_that_do_not_fit():
    params = {
        "mlp": {
            "wi": {"kernel": np.zeros((4, 6)), "kernel_lora_a": np.zeros((5, 2)), "kernel_lora_b": np.zeros((2, 6))}
        }
    }
    with pytest.raises(ValueError, match=r"mlp/wi/kernel: adapter factors \[5, 2\] x \[2, 6\] do not fit"):
        lora.merge(params, 2)
    del params["mlp"]["wi"]["kernel_lora_b"]
    with pytest.raises(ValueError, match="incomplete adapter"):
        lora.merge(params, 2)


def test_french_transfer_task_reads_like_the_tok_files(shared_data):
    from t5x_lite.data.tasks import TaskRegistry

    french = TaskRegistry.get("multi30k_enfr_tok").get_source("validation", data_dir=str(shared_data))
    english = TaskRegistry.get("multi30k_ende_tok").get_source("validation", data_dir=str(shared_data))
    records = [french[i] for i in range(200)]
    # The English side equals the official tok/ file (lowercased, normalized, Moses-tokenized) line by line.
    assert [r["inputs"] for r in records] == [english[i]["inputs"] for i in range(200)]
    for record in records:
        assert record["tok_references"] == [record["targets"]] and record["targets"] == record["targets"].lower()
    assert any(" ." in r["targets"] or "&apos;" in r["targets"] for r in records)  # tokenized French
    assert any(r["references"][0] != r["targets"] for r in records)  # sacreBLEU scores against the raw line


def test_ted_transfer_task_is_english_to_german_on_fairseq_tokenized_text(shared_data):
    from t5x_lite.data.tasks import TaskRegistry

    task = TaskRegistry.get("iwslt14_ende_tok")
    sizes = {split: len(task.get_source(split, data_dir=str(shared_data))) for split in ("train", "validation", "test")}
    assert sizes == {"train": 7283, "validation": 4600, "test": 6750}
    german_to_english = TaskRegistry.get("iwslt14_deen").get_source("test", data_dir=str(shared_data))
    test = task.get_source("test", data_dir=str(shared_data))
    for i in (0, 1, 6749):  # the IWSLT14 De->En test set, reversed; lowercased tokenized text, scored as it is
        assert test[i]["inputs"] == german_to_english[i]["targets"]
        assert test[i]["targets"] == german_to_english[i]["inputs"]
        assert test[i]["tok_references"] == [test[i]["targets"]] and test[i]["targets"] == test[i]["targets"].lower()
    assert task.prefix == "" and task.metrics == ("tok_bleu",)
