"""Schedules against hand formulas; Adafactor's factored state and descent; AdamW's decay mask; clipping; errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from t5x_lite import optimizers

STEPS = (0, 1, 50, 100, 101, 400, 1000, 3000)


def values(cfg, steps=STEPS):
    """The schedule at ``steps``, evaluated in one vectorized call (the schedules are elementwise)."""
    return np.asarray(optimizers.make_schedule(cfg)(np.asarray(steps, np.int32))).tolist()


def test_rsqrt():
    got = values({"schedule": "rsqrt", "learning_rate": 1.0, "warmup_steps": 100})
    np.testing.assert_allclose(got, [1.0 / math.sqrt(max(s, 100)) for s in STEPS], rtol=1e-6)
    ramped = values({"schedule": "rsqrt", "learning_rate": 2.0, "warmup_steps": 100, "linear_warmup": True})
    want = [2.0 / math.sqrt(max(s, 100)) * min(s / 100, 1.0) for s in STEPS]
    np.testing.assert_allclose(ramped, want, rtol=1e-6)
    assert ramped[0] == 0.0
    # T5's defaults: base 1.0 and 10k warmup steps give 0.01 on the plateau.
    assert float(optimizers.make_schedule({"learning_rate": 1.0})(0)) == pytest.approx(0.01)
    # No warmup: still finite at step 0.
    assert math.isfinite(values({"schedule": "rsqrt", "warmup_steps": 0}, [0])[0])


def test_cosine():
    cfg = {"schedule": "cosine", "learning_rate": 0.5, "warmup_steps": 100, "decay_steps": 1000, "end_factor": 0.1}

    def want(step):
        if step < 100:
            return 0.5 * step / 100
        progress = min((step - 100) / 900, 1.0)
        return 0.05 + (0.5 - 0.05) * 0.5 * (1 + math.cos(math.pi * progress))

    np.testing.assert_allclose(values(cfg), [want(s) for s in STEPS], rtol=1e-5, atol=1e-9)
    # decay_steps falls back to the run's num_train_steps.
    fallback = {"schedule": "cosine", "learning_rate": 0.5, "warmup_steps": 100, "num_train_steps": 1000}
    np.testing.assert_allclose(values(fallback), values({**fallback, "decay_steps": 1000}), rtol=1e-7)


def test_inverse_sqrt():
    cfg = {"schedule": "inverse_sqrt", "learning_rate": 2.0, "warmup_steps": 100, "d_model": 256}
    want = [0.0] + [2.0 * 256**-0.5 * min(s**-0.5, s * 100**-1.5) for s in STEPS[1:]]
    np.testing.assert_allclose(values(cfg), want, rtol=1e-6)
    peak = 2.0 * 256**-0.5 * 100**-0.5
    assert max(values(cfg)) == pytest.approx(peak, rel=1e-6)


def test_warmup_rsqrt_is_fairseqs_inverse_sqrt():
    cfg = {"schedule": "warmup_rsqrt", "learning_rate": 0.005, "warmup_steps": 100}
    want = [0.005 * min(s / 100, math.sqrt(100 / max(s, 1))) for s in STEPS]
    np.testing.assert_allclose(values(cfg), want, rtol=1e-6)
    assert max(values(cfg)) == pytest.approx(0.005) and values(cfg, [0])[0] == 0.0


def test_cooldown_decays_any_schedule_to_zero_at_the_end():
    base = {"schedule": "warmup_rsqrt", "learning_rate": 0.005, "warmup_steps": 100, "num_train_steps": 3000}
    cooled = {**base, "cooldown_steps": 1000}
    want = [v * min(1.0, max(0.0, (3000 - s) / 1000)) for v, s in zip(values(base), STEPS, strict=True)]
    np.testing.assert_allclose(values(cooled), want, rtol=1e-6, atol=1e-12)
    assert values(cooled, [2000, 2500, 3000]) == pytest.approx(
        [values(base, [2000])[0], values(base, [2500])[0] / 2, 0]
    )
    with pytest.raises(ValueError, match="cooldown_steps=10 needs num_train_steps >= cooldown_steps"):
        optimizers.make_schedule({**base, "cooldown_steps": 10, "num_train_steps": None})


def test_constant():
    np.testing.assert_allclose(values({"schedule": "constant", "learning_rate": 3e-4}), [3e-4] * len(STEPS), rtol=1e-6)
    ramped = values({"schedule": "constant", "learning_rate": 3e-4, "warmup_steps": 100, "linear_warmup": True})
    np.testing.assert_allclose(ramped, [3e-4 * min(s / 100, 1.0) for s in STEPS], rtol=1e-6)


def test_config_dict_accepted():
    cfg = ml_collections.ConfigDict({"schedule": "cosine", "learning_rate": 0.5, "warmup_steps": 10})
    cfg.decay_steps = 100
    assert values(cfg, [10]) == pytest.approx([0.5])
    optimizers.make_optimizer(ml_collections.FrozenConfigDict({**cfg.to_dict(), "optimizer": "adamw"}))


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"optimizer": "sgd"}, r"config\.optimizer='sgd' is unknown; choose one of adafactor, adamw"),
        ({"schedule": "linear"}, r"config\.schedule='linear' is unknown; choose one of rsqrt, cosine"),
        ({"schedule": "cosine", "warmup_steps": 10}, r"config\.decay_steps=None"),
        ({"schedule": "inverse_sqrt", "warmup_steps": 0}, r"config\.warmup_steps=0"),
        ({"learning_rate": -1.0}, r"config\.learning_rate=-1\.0"),
        ({"warmup_steps": 1.5}, r"config\.warmup_steps=1\.5"),
        ({"grad_clip_norm": -1.0}, r"config\.grad_clip_norm"),
    ],
)
def test_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match) as error:
        optimizers.make_optimizer(cfg)
    assert "\n" not in str(error.value)


def test_decay_mask():
    params = {
        "encoder": {
            "attention": {"query": {"kernel": np.zeros((8, 2, 4))}, "out": {"bias": np.zeros((8,))}},
            "layer_norm": {"scale": np.zeros((8,))},
            "odd": {"kernel_bias": np.zeros((8, 8)), "vector": np.zeros((8,))},
        },
        "token_embedder": {"embedding": jax.ShapeDtypeStruct((32, 8), jnp.float32)},
    }
    mask = optimizers.decay_mask(params)
    assert mask == {
        "encoder": {
            "attention": {"query": {"kernel": True}, "out": {"bias": False}},
            "layer_norm": {"scale": False},
            "odd": {"kernel_bias": False, "vector": False},
        },
        "token_embedder": {"embedding": True},
    }


def test_adamw_weight_decay_skips_bias_and_scale():
    params = {
        "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
        "norm": {"scale": jnp.ones((3,))},
    }
    cfg = {"optimizer": "adamw", "schedule": "constant", "learning_rate": 0.1, "weight_decay": 0.5}
    for tx in (optimizers.make_optimizer(cfg), optimizers.make_optimizer(cfg, params)):
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
        np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((4, 3)), rtol=1e-6)
        assert np.all(np.asarray(updates["dense"]["bias"]) == 0.0)
        assert np.all(np.asarray(updates["norm"]["scale"]) == 0.0)


def test_adafactor_state_is_factored():
    params = {
        "big": {"kernel": jnp.ones((128, 256))},
        "small": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))},
    }
    state = optimizers.make_optimizer({}).init(params)
    factored = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "v_row")) if hasattr(s, "v_row")]
    assert len(factored) == 1
    (state,) = factored
    assert state.v_row["big"]["kernel"].shape == (128,)
    assert state.v_col["big"]["kernel"].shape == (256,)
    assert state.v["big"]["kernel"].shape == (1,)  # the full second moment is not stored
    assert state.v["small"]["kernel"].shape == (4, 8)  # below min_dim_size_to_factor=128: not factored
    assert state.v["small"]["bias"].shape == (8,)
    # No momentum: nothing else of the parameters' size in the state.
    sizes = sorted(x.size for x in jax.tree.leaves(state))
    assert sum(sizes) == 1 + 128 + 256 + 1 + 1 + 1 + 1 + 1 + 32 + 8


def test_adafactor_reduces_quadratic():
    rng = np.random.default_rng(0)
    target = {"w": jnp.asarray(rng.standard_normal((128, 128)), jnp.float32), "b": jnp.ones((128,))}
    params = {"w": jnp.asarray(rng.standard_normal((128, 128)), jnp.float32), "b": jnp.zeros((128,))}
    tx = optimizers.make_optimizer({"schedule": "constant", "learning_rate": 0.05})

    def loss_fn(params):
        return sum(jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True))

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    history = []
    for _ in range(5):
        params, state, loss = step(params, state)
        history.append(float(loss))
    assert all(b < a for a, b in zip(history, history[1:], strict=False)), history
    assert history[-1] < 0.9 * history[0]


def test_global_norm_clipping_applied_first():
    params = {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}
    grads = {"kernel": jnp.full((4, 3), 100.0), "bias": jnp.full((3,), -100.0)}
    norm = float(optax.global_norm(grads))
    cfg = {"optimizer": "adamw", "schedule": "constant", "b1": 0.9, "grad_clip_norm": 1.0}
    tx = optimizers.make_optimizer(cfg)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * the gradient it saw: the clipped one, of norm 1.
    mu = next(s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
    assert float(optax.global_norm(mu)) == pytest.approx(0.1, rel=1e-5)
    # Without clipping the first moment carries the full norm.
    unclipped = optimizers.make_optimizer({**cfg, "grad_clip_norm": 0.0})
    _, state = jax.jit(unclipped.update)(grads, unclipped.init(params), params)
    mu = next(s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
    assert float(optax.global_norm(mu)) == pytest.approx(0.1 * norm, rel=1e-5)
