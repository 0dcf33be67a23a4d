"""Writes a workdir derived from a trained one (quantized, pruned): its config, vocabulary and one checkpoint.

A derived workdir is a normal workdir: ``evaluate``, ``infer``, ``load_params`` and ``init_from`` read it.
Its ``config.json`` is the source's, with the model fields changed and a record of where it came from.
"""

from __future__ import annotations

import json
from typing import Any

from t5x_lite import fileio
from t5x_lite.checkpoints import Checkpointer
from t5x_lite.data.vocab import Vocabulary


def check_target(workdir: str, out: str, verb: str) -> None:
    """Refuses to write into the source or over existing checkpoints, before any work is done."""
    source, target = fileio.workdir_path(workdir), fileio.workdir_path(out)
    if target == source:
        raise ValueError(f"--out={out} is the source workdir; {verb} into a new directory")
    if (target / "checkpoints").is_dir() and any((target / "checkpoints").iterdir()):
        raise FileExistsError(f"{target}/checkpoints already holds checkpoints; choose another --out or remove it")


def write_derived_workdir(
    workdir: str,
    out: str,
    *,
    vocab: Vocabulary,
    step: int,
    params: Any,
    model_changes: dict[str, Any],
    record_name: str,
    record: dict[str, Any],
) -> None:
    """Saves ``params`` at ``step`` in ``out`` with ``workdir``'s config (model updated by ``model_changes``), its
    vocabulary, and ``record`` both in ``config.json`` (as ``{record_name}_from``) and in ``{record_name}.json``."""
    source, target = fileio.workdir_path(workdir), fileio.workdir_path(out)
    saved = json.loads((source / "config.json").read_text(encoding="utf-8"))
    saved["model"] = {**saved["model"], **model_changes}
    saved[f"{record_name}_from"] = record
    target.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(str(target), save_every_steps=1, keep=1, async_save=False, config=saved["config"])
    try:
        checkpointer.save_vocabulary(vocab)
        checkpointer.maybe_save(step, {"params": params}, None, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    (target / "config.json").write_text(json.dumps(saved, indent=2, default=str), encoding="utf-8")
    (target / f"{record_name}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
