"""Shared fixtures; collects the parity figures that the run prints at its end."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Prepared TFDS corpora go to a fresh folder per test session, never into the user's ~/tensorflow_datasets; one per
# pytest-xdist worker too, so that two workers never prepare the same corpus in the same place at once.
if "TFDS_DATA_DIR" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="t5x_lite_tests_tfds_")
# One persistent XLA cache per test session, in a fresh temporary folder (never ~/.cache): the many tests that
# build the same tiny models, and the child processes of the CLI tests, compile each program once.
os.environ.setdefault("T5X_LITE_COMPILATION_CACHE", tempfile.mkdtemp(prefix="t5x_lite_tests_xla_"))

# hypothesis is imported here, before any test starts a thread: its pytest plugin would import it at the session's
# end otherwise, with pytest's assertion rewriting calling ast.parse, and on Python 3.11 an ast.parse that overlaps
# another thread's (a leftover Orbax thread printing a traceback) can fail the whole run with "SystemError: AST
# constructor recursion depth mismatch" (CPython gh-106905), as a -n 0 run did once here.
import hypothesis  # noqa: E402, F401
import pytest  # noqa: E402

from t5x_lite import compile_cache  # noqa: E402

compile_cache.enable()

# The classic Transformer's settings (post-LN, sinusoidal positions, biases), for small test configs.
CLASSIC_POST_LN_SINUSOIDAL = dict(
    norm_type="layernorm",
    norm_position="post",
    position_embedding="sinusoidal",
    scale_qk=True,
    scale_embeddings=True,
    use_bias=True,
    rescale_logits=False,
)


def random_params(cfg, seed: int = 0):
    """Parameters of ``cfg`` drawn with NumPy: no compilation (jit-compiling an init costs ~8 s on 2 CPU cores,
    mostly the per-parameter random number generators), for tests that check properties, not initialization."""
    import flax.linen as nn
    import jax
    import numpy as np

    from t5x_lite import network

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name in ("embedding", "rel_embedding"):
            value = rng.standard_normal(leaf.shape)
        else:  # kernels and biases: small enough that activations stay O(1) at test widths
            value = 0.2 * rng.standard_normal(leaf.shape)
        return np.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(network.abstract_params(cfg)))


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment of a child Python on CPU with ``devices`` forced host devices: XLA_FLAGS must be set before jax
    is imported, and this test session has imported it already, so multi-device checks run in a subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


PARITY_RECORDS: list[tuple[str, float, float]] = []


@pytest.fixture
def record_parity(request):
    """Call with (config name, max |delta|, bound); the table is printed at the end of the run. The figures travel
    on the test's report, so that they reach the main process from pytest-xdist's workers too."""

    def record(name: str, max_delta: float, bound: float) -> None:
        request.node.user_properties.append(("parity", (name, float(max_delta), float(bound))))

    return record


def pytest_runtest_logreport(report):
    if report.when == "call":
        PARITY_RECORDS.extend(tuple(value) for key, value in report.user_properties if key == "parity")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not PARITY_RECORDS:
        return
    terminalreporter.section("parity against transformers' PyTorch T5 (fp32 logits)")
    width = max(len(name) for name, _, _ in PARITY_RECORDS)
    for name, delta, bound in PARITY_RECORDS:
        verdict = "ok" if delta <= bound else "FAIL"
        terminalreporter.write_line(f"{name:<{width}}  max |delta| = {delta:.3e}  (bound {bound:.0e})  {verdict}")


@pytest.fixture(name="random_params")
def random_params_fixture():
    return random_params


@pytest.fixture(scope="session")
def shared_data():
    """The real corpora (../shared/data or $T5X_LITE_DATA). Missing data fails under CI=true, skips elsewhere."""
    from t5x_lite.data.paths import data_root

    try:
        return data_root()
    except FileNotFoundError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data is missing: {error}")
        pytest.skip(f"shared data not available: {error}")


@pytest.fixture(scope="module")
def numbers():
    """The synthetic numbers task (English number words -> German), built in-process: no data files."""
    from t5x_lite.data.tasks import TaskRegistry

    return TaskRegistry.get("synthetic_numbers")


@pytest.fixture(scope="module")
def vocab(numbers, tmp_path_factory):
    """The numbers task's vocabulary, trained once per test module into a temporary cache."""
    from t5x_lite.data.tasks import task_vocabulary

    return task_vocabulary(numbers, cache_dir=str(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """``(workdir, vocab_cache_dir)`` of ``tests/tiny_config.py`` trained 12 steps (scanned layers), shared read-only
    by the tests that derive models from a trained workdir (quantize, prune, distill)."""
    from t5x_lite import train
    from tests import tiny_config

    tmp_path = tmp_path_factory.mktemp("tiny_trained")
    config = tiny_config.get_config("steps=12")
    config.vocab_cache_dir = str(tmp_path / "vocab_cache")
    train.train_and_evaluate(config, str(tmp_path / "run"))
    return str(tmp_path / "run"), config.vocab_cache_dir
