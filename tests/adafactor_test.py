"""T5X's Adafactor: the update against a NumPy reference, factoring by logical axes, scanned == unscanned, state size.

The reference (``_reference_step``) follows T5X's ``Adafactor.apply_param_gradient`` (factored second moments with
decay ``1 - (t + 1) ** -0.8``, epsilon1 1e-30 on squared gradients, update clipping at RMS 1.0, the update scaled
by ``max(rms(param), 1e-3)``, no momentum) but is written differently: one [rows, columns] matrix per slice of the
batch (scanned-layer) dimensions, with the row/column choice of each parameter spelled out by hand in ``PARAMS``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import adafactor, network, optimizers
from t5x_lite.presets import get_model_config

# name: (shape, logical axes, (batch dims, row dims, column dims) or (batch dims, None) when not factored)
PARAMS = {
    "attn_query": ((16, 2, 8), ("embed", "heads", "kv"), ((), (0,), (1, 2))),
    "attn_out": ((2, 8, 16), ("heads", "kv", "embed"), ((), (2,), (0, 1))),
    "scan_wi": ((3, 16, 24), ("layers", "embed", "mlp"), ((0,), (1,), (2,))),
    "scan_out": ((3, 2, 8, 16), ("layers", "heads", "kv", "embed"), ((0,), (3,), (1, 2))),
    # rank <= 2 without a batch dimension: the heuristic (second-largest dimension as rows if >= 128 entries)
    "embedding": ((160, 130), ("vocab", "embed"), ((), (1,), (0,))),
    "small_dense": ((8, 24), ("embed", "mlp"), ((), None)),
    "scale": ((16,), ("embed",), ((), None)),
    "scan_scale": ((3, 16), ("layers", "embed"), ((0,), None)),
    "relpos": ((2, 32), ("heads", "relpos_buckets"), ((), None)),
    "zero_kernel": ((16, 2, 8), ("embed", "heads", "kv"), ((), (0,), (1, 2))),  # parameter scale = epsilon2
}
DECAYED = {"attn_query", "scan_wi", "embedding"}
GRAD_SCALES = (1.0, 0.05, 20.0, 1.0)  # a sudden large gradient at step 2 makes the update clipping act


def _lr(count):
    return 0.01 * (count + 1.0)


def _reference_init(shape, plan):
    batch, *factoring = plan
    batch_shape = tuple(shape[d] for d in batch)
    state = {}
    for index in np.ndindex(*batch_shape):
        if factoring[0] is None:
            state[index] = np.zeros([shape[d] for d in range(len(shape)) if d not in batch])
        else:
            rows, cols = factoring
            state[index] = (
                np.zeros(int(np.prod([shape[d] for d in rows]))),
                np.zeros(int(np.prod([shape[d] for d in cols]))),
            )
    return state


def _reference_step(param, grad, state, plan, step, weight_decay):
    """One T5X Adafactor step of ``param`` (float64 NumPy), slice by slice over the batch dimensions. Returns the new
    parameter and how many slices the update clipping scaled down."""
    batch, *factoring = plan
    beta = 1.0 - (step + 1.0) ** -0.8
    lr = _lr(step)
    new_param = param.copy()
    clipped = 0
    other = [d for d in range(param.ndim) if d not in batch]
    for index in state:
        where = [slice(None)] * param.ndim
        for d, i in zip(batch, index, strict=True):
            where[d] = i
        p, g = param[tuple(where)], grad[tuple(where)]  # the slice keeps the non-batch dims in order
        g2 = g * g + 1e-30
        if factoring[0] is None:
            v = beta * state[index] + (1 - beta) * g2
            state[index] = v
            y = g / np.sqrt(v)
        else:
            rows, cols = (tuple(other.index(d) for d in dims) for dims in factoring)
            order = rows + cols
            n_rows = int(np.prod([p.shape[d] for d in rows]))
            matrix = lambda x, order=order, n_rows=n_rows: np.transpose(x, order).reshape(n_rows, -1)  # noqa: E731
            r, c = state[index]
            r = beta * r + (1 - beta) * matrix(g2).mean(axis=1)
            c = beta * c + (1 - beta) * matrix(g2).mean(axis=0)
            state[index] = (r, c)
            v_hat = np.outer(r, c) / r.mean()
            y_matrix = matrix(g) / np.sqrt(v_hat)
            y = np.transpose(y_matrix.reshape([p.shape[d] for d in order]), np.argsort(order))
        rms_y = np.sqrt(np.mean(y * y))
        if rms_y > 1.0:
            clipped += 1
            y = y / rms_y
        scale = max(np.sqrt(np.mean(p * p)), 1e-3)
        new = p - lr * scale * y
        if weight_decay:
            new = new - weight_decay * p
        new_param[tuple(where)] = new
    return new_param, clipped


def _setup():
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape) * 0.5 for name, (shape, _, _) in PARAMS.items()}
    params["zero_kernel"] = np.zeros(PARAMS["zero_kernel"][0])
    grads = [{name: rng.standard_normal(shape) * s for name, (shape, _, _) in PARAMS.items()} for s in GRAD_SCALES]
    # Make the sudden large gradient uneven across rows, so the factored estimate is far from the truth and clips.
    for name in grads[2]:
        grads[2][name] = grads[2][name] * np.linspace(0.1, 3.0, grads[2][name].shape[-1])
    axes = {name: axes for name, (_, axes, _) in PARAMS.items()}
    return params, grads, axes


def test_update_matches_numpy_reference_of_t5x_adafactor():
    params, grads, axes = _setup()
    weight_decay = 1e-3
    mask = {name: name in DECAYED for name in PARAMS}
    tx = adafactor.adafactor(_lr, axes, weight_decay_rate=weight_decay, weight_decay_mask=mask)
    ours = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(ours)
    update = jax.jit(tx.update)
    reference = {name: p.copy() for name, p in params.items()}
    ref_state = {name: _reference_init(shape, plan) for name, (shape, _, plan) in PARAMS.items()}
    clipped = 0
    for step, g in enumerate(grads):
        updates, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, ours)
        ours = optax.apply_updates(ours, updates)
        for name, (_, _, plan) in PARAMS.items():
            decay = weight_decay if name in DECAYED else 0.0
            reference[name], n = _reference_step(reference[name], g[name], ref_state[name], plan, step, decay)
            clipped += n
            np.testing.assert_allclose(np.asarray(ours[name]), reference[name], rtol=2e-5, atol=1e-7, err_msg=name)
    assert clipped > 0  # the clipping branch was exercised (and matched)
    assert int(state.count) == len(grads)
    moved = np.abs(reference["zero_kernel"]).max()
    assert 0 < moved < 0.2  # a zero parameter moves by lr * epsilon2 * y, not by 0 or by lr * y


def test_state_shapes_follow_the_logical_axes():
    params, _, axes = _setup()
    state = adafactor.adafactor(0.01, axes).init(params)
    assert state.v_row["attn_query"].shape == (16,) and state.v_col["attn_query"].shape == (2, 8)
    assert state.v_row["attn_out"].shape == (16,) and state.v_col["attn_out"].shape == (2, 8)
    assert state.v_row["scan_wi"].shape == (3, 16) and state.v_col["scan_wi"].shape == (3, 24)
    assert state.v_row["scan_out"].shape == (3, 16) and state.v_col["scan_out"].shape == (3, 2, 8)
    assert state.v_row["embedding"].shape == (130,) and state.v_col["embedding"].shape == (160,)
    for name in ("small_dense", "scale", "scan_scale", "relpos"):
        assert state.v[name].shape == PARAMS[name][0], name
        assert state.v_row[name].shape == state.v_col[name].shape == (1,)
    for name in ("attn_query", "scan_wi", "embedding"):
        assert state.v[name].shape == (1,)


@pytest.mark.parametrize(
    "shape, axes, message",
    [
        ((4, 8, 2), ("embed", "heads", "flavour"), r"logical axes \['flavour'\] have no Adafactor factor rule"),
        ((4, 8, 2), ("embed", "heads"), r"2 logical axes .* shape \(4, 8, 2\)"),
        ((4, 8, 32), ("embed", "heads", "relpos_buckets"), r"mix factored .* and unfactored"),
    ],
)
def test_factor_plan_rejects_bad_axes(shape, axes, message):
    with pytest.raises(ValueError, match=message):
        adafactor.factor_plan(shape, axes, name="p")


def test_update_without_params_is_a_clear_error():
    tx = adafactor.adafactor(0.01)
    params = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"needs the params in update\(grads, state, params\)"):
        tx.update(params, tx.init(params))


def test_scanned_layers_update_like_unscanned_ones():
    """Scanned layers are batch dimensions: stacking the layers changes no statistic, scale or clipping."""
    cfg = network.TransformerConfig(
        vocab_size=160, d_model=128, num_heads=2, d_ff=256, num_encoder_layers=2, num_decoder_layers=3
    )
    scanned_cfg = cfg.replace(scan_layers=True)
    params = network.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    grads_list = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * s, jnp.float32), params) for s in (1.0, 30.0)
    ]
    tx = adafactor.adafactor(0.01, network.param_logical_axes(cfg))
    tx_scanned = adafactor.adafactor(0.01, network.param_logical_axes(scanned_cfg))
    flat, scanned = params, network.scan_params(params, cfg)
    state, state_scanned = tx.init(flat), tx_scanned.init(scanned)
    update, update_scanned = jax.jit(tx.update), jax.jit(tx_scanned.update)
    for grads in grads_list:
        updates, state = update(grads, state, flat)
        updates_scanned, state_scanned = update_scanned(network.scan_params(grads, cfg), state_scanned, scanned)
        flat = optax.apply_updates(flat, updates)
        scanned = optax.apply_updates(scanned, updates_scanned)
    for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(network.unscan_params(scanned, cfg)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # The layers do differ from each other, so mixing their statistics would have shown.
    query = [np.asarray(flat["encoder"][f"layers_{i}"]["attention"]["query"]["kernel"]) for i in range(2)]
    assert not np.allclose(query[0], query[1])


def _state_numbers(model: str) -> tuple[int, int]:
    cfg = get_model_config(model)
    params = jax.tree.map(
        lambda b: b.unbox(apply_constraint=False), network.abstract_params(cfg), is_leaf=lambda b: hasattr(b, "unbox")
    )
    tx = optimizers.make_optimizer({"optimizer": "adafactor"}, logical_axes=network.param_logical_axes(cfg))
    state = jax.eval_shape(tx.init, params)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)), network.count_params(cfg)


@pytest.mark.parametrize("model", ["t5_small", "t5_v1_1_small"])
def test_state_is_under_one_percent_of_the_parameters(model):
    state, params = _state_numbers(model)
    assert state < 0.01 * params, (state, params)
