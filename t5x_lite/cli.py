"""How the absl commands (train, evaluate, infer) start and fail: every bad flag, bad config and expected error is
one line on stderr, ``error: ...``, and exit status 2, before anything compiles; a traceback means a bug.

absl alone prints a traceback for a mistyped ``--config.key`` (ml_collections raises an AttributeError), a config
file that raises, or a missing config file, and exits 1 on a bad value.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

from t5x_lite import host_memory

# What a command raises for bad input (a missing workdir, an unreadable or non-UTF-8 file, a wrong setting), as
# opposed to a bug: printed as its message alone.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # UnicodeDecodeError is one
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _print_error(message: str) -> None:
    print(f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}", file=sys.stderr)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (its first line only) to stderr and exit with status 2."""
    _print_error(message)
    sys.exit(2)


def error_status(error: BaseException) -> int:
    """Print ``error: <its message>`` (first line) to stderr and return exit status 2: what an argparse command's
    ``main`` returns for one of ``EXPECTED_ERRORS``."""
    _print_error(str(error) or type(error).__name__)
    return 2


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _config_override(key: str, argv: Sequence[str]) -> str:
    """The ``--config.a.b=...`` argument of ``argv`` whose dotted path holds ``key`` (for the error message)."""
    for arg in argv:
        name = arg.split("=", 1)[0].lstrip("-")
        if name.startswith("config.") and key in name.split("."):
            return "--" + name
    return f"--config.{key}"


def flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """One line that says which flag or config was wrong, and why, for an exception raised while parsing flags."""
    text = str(error)
    if isinstance(error, AttributeError):  # ml_collections: an override of a key the config does not have
        name = re.search(r"[A-Za-z_]\w*", text)
        key = name.group(0) if name else text
        hint = re.search(r'Did you mean "([^"]+)"', text)
        suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
        return f"{_config_override(key, argv)}: the config has no key {key!r}{suggestion}"
    if isinstance(error, flags.Error):
        first = text.split("\n")[0].rstrip(":")
        if "Error whilst parsing config file" in text:  # the config file's get_config raised: say what it said
            return f"{first.replace(': Error whilst parsing config file', '')}: {_last_line(text)}"
        return first
    if isinstance(error, OSError) and "Failed loading config file" in text:
        return f"--config: {_last_line(text)}"
    config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config is None and "--config" in argv[:-1]:
        config = argv[list(argv).index("--config") + 1]
    where = f"the config file {config}" if config else "a flag"
    return f"{where} raised {type(error).__name__}: {_last_line(text)}"


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, each failure one line and exit status 2 (``app.run``'s ``flags_parser``)."""
    try:
        return flags.FLAGS(list(argv))
    except Exception as error:  # noqa: BLE001 -- a config file is Python and may raise anything
        fail(flag_error(error, argv))


def _drop_closed_event_loop_noise(unraisable: Any) -> None:
    """After a failed asynchronous save (a full disk), TensorStore's callbacks still post to Orbax's event loop,
    closed by then, and Python prints each as an ignored exception: noise, the save's error is reported once."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def run(main: Callable[[list[str]], None], keep_freed_memory: bool = True) -> None:
    """``app.run(main)``: flags parsed as ``parse_flags`` does, and ``EXPECTED_ERRORS`` out of ``main`` reported
    as one line with exit status 2. ``keep_freed_memory``: glibc's malloc told to reuse freed memory before anything
    runs (``t5x_lite/host_memory.py``; on for the decoding commands, the train command decides per config)."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except EXPECTED_ERRORS as error:
            sys.exit(error_status(error))
        except OSError as error:  # ml_collections defers a config file that failed to load to its first use
            if "Failed loading config file" not in str(error):
                raise
            fail(flag_error(error, sys.argv))

    sys.unraisablehook = _drop_closed_event_loop_noise
    host_memory.keep_freed_memory(keep_freed_memory)  # XLA:CPU's buffers reused step after step
    app.run(guarded, flags_parser=parse_flags)
