"""TPU slices by name: ``parse_topology('v5p-256')`` -> chips, libtpu's shape and chip config, HBM per chip;
``topology_devices`` -> libtpu's compile-only devices of that slice (no TPU needed, libtpu installed).

The names follow Cloud TPU's: v4-N and v5p-N count TensorCores (two per chip, one megacore device), v5e-N and
v6e-N count chips; ``Kx`` in front joins K identical slices over the data-center network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from t5x_lite import flops

# libtpu takes /tmp/libtpu_lockfile for the life of any process that loads it; a compile-only client must not be
# refused because another jax process on this machine loaded libtpu first. Set before the plugin initializes
# (at the first backend call, not at ``import jax``).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 1024**3
INSTALL_HINT = "pip install '.[tpu]'  (jax[tpu]: libtpu from the package registry; no TPU needed)"

# HBM per chip (vendor datasheets). v4 and v5p chips are one megacore device (two TensorCores).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
# libtpu's topology prefix of each generation ('v5p' is also accepted as 'v5').
_LIBTPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
# Chips of a slice -> its physical shape. v4 / v5p: 3D torus, full cubes (4x4x4 and up) wrap around;
# v5e / v6e: 2D, an axis of 16 wraps around.
_SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    192: (4, 4, 12),
    256: (4, 8, 8),
    512: (8, 8, 8),
    768: (8, 8, 12),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_MAX_CHIPS = {"v4": 2048, "v5p": 4096, "v5e": 256, "v6e": 256}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e", "v5": "v5p"}

FORMS = (
    "accepted forms: v4-N and v5p-N (N TensorCores, 2 per chip: v4-8 ... v4-4096, v5p-8 ... v5p-8192), "
    "v5e-N and v6e-N (N chips: 1, 4, 8, 16, 32, 64, 128, 256; also v5litepod-N), a libtpu topology "
    "'GEN:AxBxC' (v4:4x4x8, v5p:4x4x8, v5e:16x16), each optionally prefixed 'Kx' for K slices (2xv5e-256)"
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or several identical slices joined over the data-center network)."""

    name: str  # as given, e.g. 'v5e-256'
    generation: str  # v4 | v5e | v5p | v6e
    chips: int  # per slice
    topology: str  # libtpu's name, e.g. 'v5e:16x16'
    chip_config_name: str  # 'megacore' (v4, v5p: one device per chip, both TensorCores) or 'default'
    wrap: tuple[bool, bool, bool]
    chips_per_host_bounds: tuple[int, int, int]
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        return self.chips * self.num_slices

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s of one chip (``flops.PEAK_FLOPS``, the table that MFU uses)."""
        return flops.PEAK_FLOPS[f"tpu {self.generation}"]

    def describe(self) -> str:
        slices = f", {self.num_slices} slices" if self.num_slices > 1 else ""
        per = "per slice, " if self.num_slices > 1 else ""
        return (
            f"{self.name} ({self.topology}, chip_config {self.chip_config_name!r}, {self.chips} chips {per}"
            f"{self.hbm_bytes / GiB:.0f} GiB HBM each{slices})"
        )


def parse_topology(name: str, num_slices: int | None = None) -> Topology:
    """'v4-256' -> 128 chips, 'v4:4x4x8', megacore; 'v5e-256' -> 'v5e:16x16'; '2xv5e-256' -> 2 slices.

    ``num_slices`` (the ``--num_slices`` flag) multiplies a single-slice name; a ValueError names the accepted forms.
    """
    text = name.strip().lower()
    slices = 1
    match = re.fullmatch(r"(\d+)x(v.*)", text)
    if match:
        slices, text = int(match.group(1)), match.group(2)
    if num_slices is not None:
        if slices != 1 and num_slices not in (1, slices):
            raise ValueError(f"--topology {name!r} says {slices} slices but --num_slices={num_slices}; give one")
        slices = max(slices, num_slices)
    if slices < 1:
        raise ValueError(f"num_slices={slices} must be at least 1")

    def bad(why: str) -> ValueError:
        return ValueError(f"unknown TPU topology {name!r} ({why}); {FORMS}")

    if ":" in text:  # libtpu form, e.g. v4:4x4x8
        generation, _, dims = text.partition(":")
        generation = _ALIASES.get(generation, generation)
        if generation not in HBM_BYTES:
            raise bad(f"generation {generation!r} is not one of {', '.join(HBM_BYTES)}")
        if not re.fullmatch(r"\d+(x\d+)*", dims):
            raise bad(f"{dims!r} is not a shape like 4x4x8")
        shape = tuple(int(d) for d in dims.split("x"))
        want = 2 if generation in ("v5e", "v6e") else 3
        if len(shape) != want or min(shape) < 1:
            raise bad(f"{generation} slices are {want}-dimensional")
        chips = math.prod(shape)
    else:
        match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
        if not match:
            raise bad("expected GENERATION-SIZE")
        generation = _ALIASES.get(match.group(1), match.group(1))
        size = int(match.group(2))
        if generation not in HBM_BYTES:
            raise bad(f"generation {generation!r} is not one of {', '.join(HBM_BYTES)}")
        if generation in ("v4", "v5p"):  # the number counts TensorCores: two per chip
            if size % 2:
                raise bad(f"{generation}-N counts TensorCores (2 per chip), N must be even")
            chips, table = size // 2, _SHAPES_3D
        else:
            chips, table = size, _SHAPES_2D
        if chips not in table or chips > _MAX_CHIPS[generation]:
            sizes = sorted(n * (2 if generation in ("v4", "v5p") else 1) for n in table if n <= _MAX_CHIPS[generation])
            raise bad(f"{generation} sizes here: {', '.join(map(str, sizes))}; other shapes: give GEN:AxBxC")
        shape = table[chips]
    if len(shape) == 3:
        wrap = (True, True, True) if min(shape) >= 4 else (False, False, False)
        chip_config = "megacore"
        bounds = (min(shape[0], 2), min(shape[1], 2), 1)
    else:
        wrap = (shape[0] == 16, shape[1] == 16, False)
        chip_config = "default"
        bounds = (min(shape[0], 2), min(shape[1], 2), 1)
    topology = f"{_LIBTPU_NAMES[generation]}:{'x'.join(map(str, shape))}"
    return Topology(name, generation, chips, topology, chip_config, wrap, bounds, slices)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """libtpu prints GCE metadata warnings on file descriptor 2 when it starts off a TPU VM: keep them unless an
    error follows."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(topology: Topology) -> list[Any]:
    """Compile-only devices of ``topology`` (libtpu); a one-line RuntimeError with the install command without it."""
    try:
        from jax.experimental import topologies
    except ImportError as error:  # pragma: no cover - jax always has it
        raise RuntimeError(f"jax.experimental.topologies is unavailable ({error}); {INSTALL_HINT}") from error
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"libtpu is not installed, so TPU programs cannot be compiled here: {INSTALL_HINT}")
    try:
        with quiet_stderr():
            description = topologies.get_topology_desc(
                platform="tpu",
                topology_name=topology.topology,
                chip_config_name=topology.chip_config_name,
                chips_per_host_bounds=topology.chips_per_host_bounds,
                num_slices=topology.num_slices,
                wrap=topology.wrap,
            )
    except Exception as error:  # libtpu's JaxRuntimeError: a bad shape, an incompatible libtpu
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(f"libtpu cannot describe {topology.topology} ({first})") from error
    devices = list(description.devices)
    if len(devices) != topology.num_devices:
        raise RuntimeError(f"libtpu gave {len(devices)} devices for {topology.describe()}, not {topology.num_devices}")
    return devices
