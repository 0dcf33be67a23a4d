"""JAX's persistent compilation cache for ``t5x_lite.train`` and ``t5x_lite.evaluate``: a restart, a resumed run
or the next point of a sweep loads its compiled programs (train state init, train steps, decoding) from disk.

The directory is ``config.compilation_cache_dir``, else ``$T5X_LITE_COMPILATION_CACHE``, else
``~/.cache/t5x_lite/xla``; ``none`` (or ``off``) turns it off. Only programs that took at least
``MIN_COMPILE_SECONDS`` to compile are written. The cache is trusted code: keep it in a directory only you can
write (JAX's warning).
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

DEFAULT_DIR = "~/.cache/t5x_lite/xla"
ENV_VAR = "T5X_LITE_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 1.0
OFF = ("none", "off")


def resolve_dir(configured: str | None = None) -> str | None:
    """The cache directory for a ``compilation_cache_dir`` setting (empty: the environment, then the default);
    None when turned off."""
    path = configured or os.environ.get(ENV_VAR, "") or DEFAULT_DIR
    if path.strip().lower() in OFF:
        return None
    return os.path.abspath(os.path.expanduser(path))


def enable(configured: str | None = None) -> str | None:
    """Turns the persistent compilation cache on at ``resolve_dir(configured)`` (or off) for this process and
    returns the directory. Works after earlier compiles too: JAX's cache state is reset to read the new setting."""
    path = resolve_dir(configured)
    current = jax.config.jax_compilation_cache_dir
    if path == (current or None):
        return path
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise ValueError(
                f"compilation_cache_dir={path!r} cannot be created ({error}); pass another directory or 'none'"
            ) from error
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    return path
