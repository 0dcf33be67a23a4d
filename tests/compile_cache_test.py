"""The persistent compilation cache: where it goes, how it is turned off, and that a second process hits it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from t5x_lite import compile_cache
from tests.conftest import REPO_ROOT, cpu_subprocess_env

# Compiles a program that takes over a second to build (a chain of dependent matmuls XLA cannot fold), then
# prints how many persistent-cache hits jax recorded.
_CHILD = """
import jax, jax.numpy as jnp
from jax import monitoring
from t5x_lite import compile_cache
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
print("dir", compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

@jax.jit
def f(x):
    for i in range(60):
        x = jnp.tanh(x @ x.T + i) * jnp.sin(x)
    return x

f(jnp.ones((8, 8))).block_until_ready()
print("hits", len(hits))
"""


def _child(cache: str) -> dict[str, str]:
    env = cpu_subprocess_env()
    env["T5X_LITE_COMPILATION_CACHE"] = cache
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("dir ", "hits ")))


def test_second_process_loads_compiled_programs_from_the_cache(tmp_path):
    cache = str(tmp_path / "xla")
    first = _child(cache)
    assert first == {"dir": cache, "hits": "0"}
    assert os.listdir(cache)  # the first process wrote its executable
    second = _child(cache)
    assert second["hits"] != "0"


def test_resolve_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.resolve_dir("") == os.path.expanduser("~/.cache/t5x_lite/xla")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_dir("") == str(tmp_path / "env")
    assert compile_cache.resolve_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")  # the config wins
    for off in ("none", "off", "None"):
        assert compile_cache.resolve_dir(off) is None


def test_uncreatable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"compilation_cache_dir=.* cannot be created .* or 'none'"):
        compile_cache.enable(str(blocker / "xla"))
