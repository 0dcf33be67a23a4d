"""Freed host memory kept for reuse: a jitted program's large temporary is not page-faulted in on every call."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT, cpu_subprocess_env

# A program with a 64 MB temporary ([2048, 8192] float32), called 5 times after 2 warm-up calls; prints the page
# faults (minor: fresh pages) per call.
_FAULTS = """
import resource
import jax, jax.numpy as jnp

@jax.jit
def f(x, w):
    return (jnp.tanh(x @ w) @ w.T).sum()

x, w = jnp.ones((2048, 256)), jnp.full((256, 8192), 0.01)
for _ in range(2):
    f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x, w).block_until_ready()
print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

# The policy asked for directly (WANTED=1: as by a run's config), then the program.
_CHILD = (
    """
import os
from t5x_lite import host_memory
print("applied", host_memory.keep_freed_memory(os.environ.get("WANTED") == "1"))
"""
    + _FAULTS
)

# A command's entry point run as ``python -m`` runs it, with absl's app.run made a no-op (so ``cli.run`` sets up
# what it sets up before the command's main would start), then the program.
_ENTRY_CHILD = (
    """
import os, runpy
from absl import app
app.run = lambda main, **kwargs: None
runpy.run_module(os.environ["ENTRY"], run_name="__main__")
"""
    + _FAULTS
)


def _child(program: str = _CHILD, **env: str) -> dict[str, str]:
    child_env = cpu_subprocess_env(**env)
    if "T5X_LITE_KEEP_FREED_MEMORY" not in env:  # the caller's own setting would decide it
        child_env.pop("T5X_LITE_KEEP_FREED_MEMORY", None)
    out = subprocess.run(
        [sys.executable, "-c", program],
        env=child_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("applied ", "faults ")))


def test_kept_memory_is_reused_without_page_faults():
    for asked in (_child(WANTED="1"), _child(T5X_LITE_KEEP_FREED_MEMORY="1")):  # by the run's config, or by the user
        assert asked["applied"] == "True"
        assert float(asked["faults"]) < 1600  # a tenth of the 16,384 faults (4 KB pages) of 64 MB of fresh pages


def test_by_default_or_opted_out_glibc_is_left_alone_and_the_faults_come_back():
    # opt-in: off unless asked, and T5X_LITE_KEEP_FREED_MEMORY=0 wins over a config that asks
    for left_alone in (_child(), _child(WANTED="1", T5X_LITE_KEEP_FREED_MEMORY="0")):
        assert left_alone["applied"] == "False"
        assert float(left_alone["faults"]) > 1000  # mapped afresh on each call: what the policy removes


def test_only_configs_that_measured_a_gain_ask_for_it():
    from t5x_lite.config_files import default_train_config, load_config

    assert not default_train_config().keep_freed_memory  # t5_small's step was about 1.5x slower with it
    assert load_config("configs/multi30k.py").keep_freed_memory  # Transformer-tiny's was faster


def test_decoding_commands_keep_freed_memory_and_train_leaves_it_to_the_config():
    for entry in ("t5x_lite.evaluate", "t5x_lite.infer"):  # cli.run's default: beam search needs it
        ran = _child(_ENTRY_CHILD, ENTRY=entry)
        assert float(ran["faults"]) < 1600, entry
    ran = _child(_ENTRY_CHILD, ENTRY="t5x_lite.train")  # main applies config.keep_freed_memory, later
    assert float(ran["faults"]) > 1000
