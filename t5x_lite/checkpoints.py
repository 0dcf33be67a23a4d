"""Orbax checkpoints of a training run: the train state, the data-iterator state, the run config, the vocabulary.

A thin layer over ``orbax.checkpoint.CheckpointManager``; the train state is any pytree of jax arrays (a
``TrainState`` flax struct, a dict), so this module does not depend on the trainer. On disk::

    WORKDIR/
      vocab/                 spm.model + vocab.json, written once by ``save_vocabulary`` (Vocabulary.save)
      checkpoints/
        <step>/
          state/             StandardSave of the state pytree (OCDBT + zarr; sharded arrays written in place)
          data/              JSON: the Grain iterator state (``pipeline.iterator_state``)
          config/            JSON: the run config dict
          _CHECKPOINT_METADATA, metrics/ (when metrics were given)

Typical train loop::

    ckpt = Checkpointer(workdir, save_every_steps=1000, keep=3, keep_best=1, config=config.to_dict())
    ckpt.save_vocabulary(vocab)
    if ckpt.latest_step() is not None:                              # automatic resume
        state, data_state, _ = ckpt.restore(abstract_state=abstract_state)   # ShapeDtypeStructs with .sharding
        iterator = pipeline.restore_iterator(dataset, data_state)
    handler = install_preemption_handler()
    for step in ...:
        ...
        ckpt.maybe_save(step, state, pipeline.iterator_state(iterator), metrics, force=preemption_requested())
        if preemption_requested():
            break
    ckpt.close(); handler.uninstall()

Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a crash during a
save leaves the previous step as the latest restorable one; leftover temporary directories are ignored and
removed when the next ``Checkpointer`` opens the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from t5x_lite import adafactor, fileio

CHECKPOINTS_DIR = "checkpoints"
VOCAB_DIR = "vocab"
STATE, DATA, CONFIG = "state", "data", "config"
CONVERTED_PARAMS_DIR = "params"  # convert.save_converted layout: WORKDIR/params + WORKDIR/model_config.json
CONVERTED_CONFIG_FILE = "model_config.json"
CHECKSUMS_FILE = "checksums.json"  # in each <step>/: sha256 and size of every file of the step, once it is complete
CORRUPT_DIR = "checkpoints.corrupt"  # WORKDIR/checkpoints.corrupt/<step>: damaged steps moved aside on resume


class CorruptCheckpointError(ValueError):
    """A saved step that cannot be read back as written (missing, truncated or altered files)."""


class DiskFullError(OSError):
    """A checkpoint save ran out of disk space: the earlier steps are intact, the partial one is left in Orbax's
    temporary directory (removed when the workdir is next opened)."""


def _disk_full(error: BaseException) -> bool:
    text = str(error)
    return getattr(error, "errno", None) == 28 or "No space left on device" in text or "os_error_code='28'" in text


def _file_digests(directory: str) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256]}`` of every file under ``directory`` except the manifest itself."""
    import hashlib

    out: dict[str, list[Any]] = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if relative == CHECKSUMS_FILE:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
            out[relative] = [os.path.getsize(path), digest.hexdigest()]
    return dict(sorted(out.items()))


def write_checksums(step_dir: str) -> None:
    """Write ``step_dir/checksums.json`` (atomically) for a complete step: Orbax checks structure, not contents, so
    a flipped byte in array data would otherwise load as a wrong value without any error."""
    data = json.dumps({"sha256": _file_digests(step_dir)}, indent=0).encode()
    fileio.write_bytes_atomic(os.path.join(step_dir, CHECKSUMS_FILE), data)


def verify_checksums(step_dir: str) -> bool:
    """Compare ``step_dir`` with its manifest; CorruptCheckpointError naming the first file that is missing or
    differs. False when the step has no manifest (written before manifests, or killed before writing it)."""
    manifest = os.path.join(step_dir, CHECKSUMS_FILE)
    if not os.path.isfile(manifest):
        return False
    try:
        with open(manifest, encoding="utf-8") as f:
            expected = json.load(f)["sha256"]
    except (ValueError, KeyError, OSError) as error:
        raise CorruptCheckpointError(f"{manifest} is unreadable ({error})") from None
    actual = _file_digests(step_dir)
    for relative, (size, digest) in expected.items():
        if relative not in actual:
            raise CorruptCheckpointError(f"{relative} is missing")
        if actual[relative][0] != size:
            raise CorruptCheckpointError(f"{relative} has {actual[relative][0]} bytes, {size} were written")
        if actual[relative][1] != digest:
            raise CorruptCheckpointError(f"{relative} does not match its checksum (altered on disk)")
    return True


class _DropOrbaxNoise(logging.Filter):
    """Orbax warns "Given directory is read only" and "CheckpointManagerOptions.read_only=True, setting
    save_interval_steps=0" whenever a manager opens read-only, which is every evaluation and inference load here:
    by design, so these say nothing. And its save thread (and asyncio, for the writes' futures) logs the traceback
    of each write that ran out of disk space, which ``Checkpointer`` raises again where it waits for the save, as
    one DiskFullError that says where and what to do. Other records pass."""

    NOTICES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and _disk_full(record.exc_info[1]):
            return False
        return not str(record.msg).startswith(self.NOTICES)


logging.getLogger("absl").addFilter(_DropOrbaxNoise())
logging.getLogger("asyncio").addFilter(_DropOrbaxNoise())  # the same failed writes, as futures nobody awaited


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line if len(line) <= 200 else line[:200] + '...'}"


def _path_name(path: tuple[Any, ...]) -> str:
    """``params/encoder/layers_0/...`` of a jax key path."""
    return "/".join(adafactor.path_names(path))


def _to_json_dict(config: Any) -> dict[str, Any]:
    """A JSON-serializable dict of a run config (dict or ml_collections ConfigDict); clear error otherwise."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"the run config must be JSON-serializable to be checkpointed ({_first_line(error)})"
        ) from None


def _single_device_abstract(metadata_tree: Any) -> Any:
    """ShapeDtypeStructs on the first local device for a checkpoint's array metadata (tools, tests, eval)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(leaf: Any) -> Any:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)
        return leaf

    return jax.tree.map(abstract, metadata_tree)


class Checkpointer:
    """Saves and restores ``WORKDIR/checkpoints/<step>/{state,data,config}`` with Orbax.

    Keep policy: the last ``keep`` checkpoints, plus the best ``keep_best`` among those saved with
    ``metrics[best_metric]`` (orbax ``AnyPreservationPolicy(LatestN, BestN)``: a checkpoint survives when either
    policy keeps it). Checkpoints saved without that metric only count as "last".
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_every_steps: int,
        keep: int = 3,
        keep_best: int = 0,
        best_metric: str = "eval/loss",
        best_mode: str = "min",
        async_save: bool = True,
        config: Any = None,
        read_only: bool = False,
    ) -> None:
        """``read_only`` opens a workdir that another process may be training in: nothing is created, saved or
        cleaned up (a writer's in-flight temporary directories are left alone)."""
        if save_every_steps < 1:
            raise ValueError(f"save_every_steps={save_every_steps} must be >= 1")
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 (the latest checkpoint is what a resume needs)")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r} must be 'min' or 'max'")
        self._read_only = read_only
        self.workdir = str(fileio.workdir_path(workdir))  # a local path made absolute, or a bucket URL
        self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
        self.save_every_steps = save_every_steps
        self.best_metric = best_metric
        self.config = _to_json_dict(config)
        policies: list[Any] = [ocm.LatestN(n=keep)]
        if keep_best > 0:
            policies.append(
                ocm.BestN(
                    get_metric_fn=lambda metrics: float(metrics[best_metric]),
                    reverse=best_mode == "min",  # BestN keeps the *last* n of the sorted order
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: ocp.JsonCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    # ---------------------------------------------------------------------------------------------------------
    # Saving.
    # ---------------------------------------------------------------------------------------------------------

    def save_vocabulary(self, vocab: Any) -> str:
        """Copy the vocabulary into ``WORKDIR/vocab/`` once (a later call with the same vocabulary is a no-op)."""
        directory = os.path.join(self.workdir, VOCAB_DIR)
        if fileio.workdir_path(directory).is_dir() and any(fileio.workdir_path(directory).iterdir()):
            return directory
        if jax.process_index() == 0:
            vocab.save(directory)
        return directory

    def maybe_save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any] | None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save when ``step % save_every_steps == 0`` or ``force``; returns whether a save was started.

        With ``async_save`` the arrays are copied off the devices before this returns and written in the
        background, so the train step may donate ``state`` right after. A step already on disk is not rewritten.
        """
        step = int(step)
        if not (force or step % self.save_every_steps == 0):
            return False
        if step in self._manager.all_steps():
            return False
        self.wait()  # the previous save is complete (Orbax would wait for it anyway): its manifest goes first
        metrics = {k: float(v) for k, v in (metrics or {}).items() if np.ndim(v) == 0}
        with self._reporting_disk_full(step):
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardSave(state),
                        DATA: ocp.args.JsonSave(dict(data_state or {})),
                        CONFIG: ocp.args.JsonSave(self.config),
                    }
                ),
                metrics=metrics if self.best_metric in metrics else None,
                force=True,
            )
        return bool(saved)

    @contextlib.contextmanager
    def _reporting_disk_full(self, step: int | None = None):
        """Turn a save's out-of-space failure (Orbax/TensorStore raise it as a ValueError with errno 28 inside)
        into a DiskFullError that says where, which step failed and which step a rerun resumes from."""
        try:
            yield
        except Exception as error:
            if not _disk_full(error):
                raise
            self._manager.reload()
            intact = self.all_steps()
            if step is None:  # an asynchronous save failed: its temporary directory names the step
                partial = [n for n in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in n]
                step = int(partial[0].split(".")[0]) if partial and partial[0].split(".")[0].isdigit() else None
            failed = f"step {step}" if step is not None else "a checkpoint"
            where = f"no space left on device while saving {failed} in {self.directory}; "
            if intact:
                where += (
                    f"steps {intact} are intact: free space and run the same command to resume from step {intact[-1]}"
                )
            else:
                where += "no earlier checkpoint exists: free space and run the same command"
            raise DiskFullError(28, where) from None

    def wait(self) -> None:
        """Block until background saves are on disk (and old checkpoints deleted per the keep policy), then write
        the checksum manifest of each complete step that lacks one."""
        with self._reporting_disk_full():
            self._manager.wait_until_finished()
        self._write_missing_checksums()

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads, also when a save failed (a full disk): a thread
        still running at interpreter exit aborts the process, and the failure is then lost in a SIGABRT."""
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # the save's failure is the error to report, not a second one
                self._manager.close()
            raise
        self._manager.close()

    def _write_missing_checksums(self) -> None:
        # process 0 alone (the files of all processes are on the shared filesystem once the save is complete);
        # local workdirs only: hashing a bucket's objects would mean reading them back
        if self._read_only or fileio.is_url(self.directory) or jax.process_index() != 0:
            return
        for step in self._manager.all_steps():
            step_dir = self._step_dir(step)
            if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, CHECKSUMS_FILE)):
                write_checksums(step_dir)

    # ---------------------------------------------------------------------------------------------------------
    # Restoring.
    # ---------------------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending (temporary directories of unfinished saves excluded)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when the workdir has none (a fresh run)."""
        return self._manager.latest_step()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return int(step)

    def state_metadata(self, step: int | None = None) -> Any:
        """The saved state's tree of array metadata (shape, dtype), read without loading arrays."""
        step = self._resolve_step(step)
        try:
            metadata = self._manager.item_metadata(step)[STATE]
            if metadata is None:
                raise FileNotFoundError(f"{STATE}/_METADATA is missing or unreadable")
            return metadata.tree
        except Exception as error:  # noqa: BLE001 - any orbax/tensorstore failure means an unreadable step
            raise self._corrupt(step, error) from None

    def _corrupt(self, step: int, error: BaseException) -> CorruptCheckpointError:
        earlier = [s for s in self.all_steps() if s < step]
        hint = f"restore an earlier step with restore(step={earlier[-1]})" if earlier else "no earlier step exists"
        return CorruptCheckpointError(
            f"checkpoint {self._step_dir(step)} is corrupt or incomplete ({_first_line(error)}); delete it or {hint}"
        )

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """One-line error naming the first parameter whose saved shape differs from the requested one."""
        saved = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(self.state_metadata(step))[0]}
        wanted = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        for path, leaf in wanted:
            name = _path_name(path)
            if name not in saved:
                raise ValueError(
                    f"checkpoint {self._step_dir(step)} has no {name!r}: it was written by a different model "
                    "config or train state; use another --workdir or the config it was trained with"
                )
            if tuple(np.shape(leaf)) != tuple(saved[name].shape):
                raise ValueError(
                    f"checkpoint {self._step_dir(step)} holds {name!r} with shape {tuple(saved[name].shape)} but the "
                    f"model expects {tuple(np.shape(leaf))}: the workdir was written by a different model config; "
                    "use another --workdir or the config it was trained with"
                )

    def restore(
        self,
        step: int | None = None,
        abstract_state: Any = None,
        shardings: Any = None,
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, data_state, config) of ``step`` (default: latest), arrays placed on the target shardings.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays of the state's
        structure, e.g. ``jax.eval_shape(init_fn)`` with shardings from the partitioning rules; ``shardings``, a
        pytree of the same structure, overrides them. The checkpoint may have been written on any other mesh.
        Without either, the state is restored as saved (dict tree) onto the first local device.
        """
        step = self._resolve_step(step)
        if not fileio.is_url(self.directory):
            try:
                verify_checksums(self._step_dir(step))
            except CorruptCheckpointError as error:
                raise self._corrupt(step, error) from None
        if abstract_state is None:
            target = _single_device_abstract(self.state_metadata(step))
        else:
            target = jax.tree.map(
                lambda x: (
                    x
                    if isinstance(x, jax.ShapeDtypeStruct)
                    else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                ),
                abstract_state,
            )
        if shardings is not None:
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
        self._check_shapes(step, target)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(target),
                        DATA: ocp.args.JsonRestore(),
                        CONFIG: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as error:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
            raise self._corrupt(step, error) from None
        return restored[STATE], dict(restored[DATA] or {}), dict(restored[CONFIG] or {})

    def move_aside(self, step: int) -> str:
        """Move a damaged step out of ``checkpoints/`` into ``WORKDIR/checkpoints.corrupt/<step>[.N]`` (kept for a
        post-mortem, never deleted) so that it stops being the latest; returns where it went."""
        target = os.path.join(self.workdir, CORRUPT_DIR, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            suffix = 0
            while os.path.exists(target + (f".{suffix}" if suffix else "")):
                suffix += 1
            target += f".{suffix}" if suffix else ""
            os.rename(self._step_dir(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"t5x_lite moved checkpoint {step} aside")
        self._manager.reload()
        return target

    def restore_latest_good(
        self, abstract_state: Any = None, shardings: Any = None
    ) -> tuple[int, tuple[Any, dict[str, Any], dict[str, Any]]] | None:
        """``(step, restore(step))`` of the newest step that reads back intact, or None without checkpoints. Each
        newer damaged step is reported with a warning naming it and moved aside (``move_aside``); when every step
        is damaged, a CorruptCheckpointError (a run never restarts from scratch on its own)."""
        if fileio.is_url(self.directory):  # no moving of bucket objects: the latest step or its error
            latest = self.latest_step()
            return None if latest is None else (latest, self.restore(latest, abstract_state, shardings))
        moved: list[str] = []
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, shardings)
            except CorruptCheckpointError as error:
                where = self.move_aside(step)
                moved.append(where)
                message = f"{error}; moved it to {where} and trying the previous step"
                logging.warning(message)
                print(f"warning: {message}", file=sys.stderr, flush=True)
        if moved:
            raise CorruptCheckpointError(
                f"every checkpoint in {self.directory} is damaged (moved to {', '.join(moved)}); "
                "the run does not start again from scratch on its own: remove --workdir's checkpoints.corrupt "
                "entries you do not need and start a fresh run in another --workdir"
            )
        return None


def _saved_model(root: Any) -> tuple[Any, dict[str, Any]]:
    """(``TransformerConfig``, train config dict) of the workdir ``root`` from its ``config.json``."""
    from t5x_lite import network

    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: this checkpoint needs it to know its model")
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    return network.TransformerConfig.from_dict(saved["model"]), saved.get("config", {})


def _with_lora_base(root: Any, params: Any) -> Any:
    """A LoRA run's checkpoint holds its adapters only: add the base weights from the run's ``init_from``.
    Anything else passes through."""
    from t5x_lite import lora, network

    if not lora.holds_adapters_only(params):
        return params
    cfg, config = _saved_model(root)
    base_dir = config.get("init_from", "")
    if not base_dir or not fileio.workdir_path(base_dir).is_dir():
        raise FileNotFoundError(
            f"{root} holds LoRA adapters only; their base model, init_from={base_dir!r} in its config.json, is not a "
            "directory: restore that workdir (or point config.json's init_from at a copy of it)"
        )
    base = network.lora_base_params(cfg, load_params(base_dir), f"the base model {base_dir} of {root}")
    return lora.with_adapters(base, params)


def _rebuild_quantized(root: Any, params: Any) -> Any:
    """A quantized workdir (``t5x_lite.quantize``) stores ``{qvalue, scale}`` dicts: rebuild the Qwix tree that
    its model (``config.json``'s ``model.quantization``) applies. Float checkpoints pass through."""
    from t5x_lite import network, quantization

    if not quantization.holds_quantized(params):
        return params
    cfg, _ = _saved_model(root)
    if not cfg.quantization:
        raise ValueError(f"{root} holds quantized weights but config.json's model.quantization is empty")
    return network.runtime_params(cfg, params)


# -------------------------------------------------------------------------------------------------------------
# Parameters only, for tools and tests.
# -------------------------------------------------------------------------------------------------------------


def load_params(workdir: str | os.PathLike, step: int | None = None) -> Any:
    """The ``params`` subtree of a training checkpoint (latest or ``step``), or of a converted HF checkpoint.

    ``WORKDIR/checkpoints/`` is read when present; otherwise the ``convert.save_converted`` layout
    (``WORKDIR/params`` + ``model_config.json``). Arrays land on the first local device.
    """
    root = fileio.workdir_path(workdir)
    workdir = str(root)
    if (root / CHECKPOINTS_DIR).is_dir():
        checkpointer = Checkpointer(workdir, save_every_steps=1, async_save=False, read_only=True)
        try:
            step = checkpointer._resolve_step(step)
            metadata = checkpointer.state_metadata(step)
            if not isinstance(metadata, Mapping) or "params" not in metadata:
                raise ValueError(f"the state in {checkpointer._step_dir(step)} has no 'params' entry")
            # Restore only the params subtree: the optimizer state is never read.
            target = {"params": _single_device_abstract(metadata["params"])}
            args = ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
            try:
                with ocp.PyTreeCheckpointer() as reader:
                    restored = reader.restore(os.path.join(checkpointer._step_dir(step), STATE), args=args)
            except Exception as error:  # noqa: BLE001
                raise checkpointer._corrupt(step, error) from None
            return _rebuild_quantized(root, _with_lora_base(root, restored["params"]))
        finally:
            checkpointer.close()
    if (root / CONVERTED_PARAMS_DIR).is_dir() and (root / CONVERTED_CONFIG_FILE).is_file():
        if step is not None:
            raise ValueError(f"{workdir} holds a converted checkpoint (no steps); call load_params without step")
        from t5x_lite import convert

        return convert.load_converted(workdir)[1]
    raise FileNotFoundError(
        f"{workdir} has neither {CHECKPOINTS_DIR}/ (a training run) nor {CONVERTED_PARAMS_DIR}/ + "
        f"{CONVERTED_CONFIG_FILE} (python -m t5x_lite.convert from-hf)"
    )


# -------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT set a flag; the train loop saves at the current step and exits.
# -------------------------------------------------------------------------------------------------------------

_PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []  # signal numbers received since install (module state: signal handlers are global)


def preemption_requested() -> bool:
    """True once SIGTERM or SIGINT arrived after ``install_preemption_handler``: save now and exit."""
    return bool(_requested)


@dataclasses.dataclass
class PreemptionHandler:
    """Installed SIGTERM/SIGINT handlers; ``uninstall()`` puts the previous ones back and clears the flag."""

    previous: dict[int, Any]

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        _requested.clear()

    @property
    def requested(self) -> bool:
        return preemption_requested()


def install_preemption_handler(
    callback: Callable[[int], None] | None = None, signals: tuple[int, ...] = _PREEMPTION_SIGNALS
) -> PreemptionHandler:
    """Make SIGTERM/SIGINT set the flag polled by ``preemption_requested()`` instead of killing the process.

    Why: a preempted TPU VM or a SLURM job gets SIGTERM some seconds before SIGKILL; the loop should finish its
    step, save that step and exit 0. ``callback(signum)``, if given, runs inside the handler: keep it tiny (log a
    line). A second signal while the first is pending falls through to the previous handler (e.g. a second
    Ctrl-C still interrupts a stuck run). Must be called from the main thread. ``signals``: which ones (a
    multi-process run leaves SIGTERM to JAX's preemption service, which tells every process: ``PreemptionSync``).
    """
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handle(signum: int, frame: Any) -> None:
        if _requested:
            old = previous.get(signum)
            if callable(old):
                old(signum, frame)
                return
            if old == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        _requested.append(signum)
        if callback is not None:
            callback(signum)

    _requested.clear()
    for signum in signals:
        signal.signal(signum, handle)
    return PreemptionHandler(previous)


class PreemptionSync:
    """When to save and stop on preemption, agreed by every process.

    One process: SIGTERM/SIGINT set a flag (``install_preemption_handler``) and the run saves the step it is at.
    Several processes: SIGTERM reaches one of them, but a save is a collective that every process must join at the
    same step. JAX's preemption service (``jax.distributed``) catches SIGTERM in whichever process gets it, tells
    the others through the coordination service, and ``reached_preemption_sync_point(step)`` turns True on all of
    them at the same step (the largest step any of them is at, plus one). SIGINT stays local (a Ctrl-C)."""

    def __init__(self) -> None:
        self.multi_process = jax.process_count() > 1
        signals = (signal.SIGINT,) if self.multi_process else _PREEMPTION_SIGNALS
        self.handler = install_preemption_handler(signals=signals)
        self._reached = False

    def should_stop(self, step: int) -> bool:
        """Call after every step, with the step just done (the same sequence on every process)."""
        if self.multi_process and not self._reached:
            from jax.experimental import multihost_utils

            self._reached = multihost_utils.reached_preemption_sync_point(step)
        return self._reached or self.handler.requested

    def uninstall(self) -> None:
        self.handler.uninstall()
