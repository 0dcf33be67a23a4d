"""Decode a split with a trained workdir's checkpoint and score it the way published numbers are scored.

    python -m t5x_lite.evaluate --workdir DIR [--split S] [--beam_size 4 --alpha 0.6 | --temperature T
        --top_k K --top_p P] [--checkpoint_step N | --average_last N] [--batch_size 64] [--max_examples 0]

Writes ``DIR/eval/<split>.<tag>.predictions.txt`` (one line per example, in order) and
``DIR/eval/<split>.<tag>.json`` (metrics, sacreBLEU signatures, decoding settings, checkpoint steps), and prints
a table. ``--average_last N`` averages the parameters of the last N checkpoints, as Vaswani et al. (2017) did.
Periodic evaluation during training uses the same code (``t5x_lite.evaluation.evaluate_split``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence

from absl import app, flags, logging

from t5x_lite import cli, compile_cache, fileio, models
from t5x_lite.evaluation import evaluate_loaded, load_workdir

# ---------------------------------------------------------------------------------------------- command line

_WORKDIR = flags.DEFINE_string("workdir", None, "A t5x_lite.train workdir (config.json, vocab/, checkpoints/).")
_TASK = flags.DEFINE_string("task", None, "Decode this registered task instead of the trained one (same vocabulary).")
_SPLIT = flags.DEFINE_string("split", None, "Split to decode (default: the config's eval_split).")
_BEAM = flags.DEFINE_integer("beam_size", 1, "Beam size; 1 is greedy.")
_ALPHA = flags.DEFINE_float("alpha", 0.6, "Length penalty exponent of beam search, ((5 + len) / 6) ** alpha.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sample at this temperature (0 is greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sampling: keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sampling: keep the smallest set of tokens reaching this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MAX_LENGTH = flags.DEFINE_integer("max_decode_length", 0, "Maximum new tokens (0: the task's target length).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the latest).")
_AVERAGE = flags.DEFINE_integer("average_last", 0, "Average the parameters of the last N checkpoints.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples decoded at once.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Decode only the first N examples (0: all).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Local corpora (default: the config's, then $T5X_LITE_DATA, then ../shared/data)."
)


def decode_settings_from_flags() -> models.DecodeSettings:
    """The decoding flags (shared with ``t5x_lite.infer``) as DecodeSettings."""
    return models.DecodeSettings(
        beam_size=_BEAM.value,
        alpha=_ALPHA.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        max_decode_length=_MAX_LENGTH.value,
        seed=_SEED.value,
    )


def run_tag(settings: models.DecodeSettings, steps: Sequence[int]) -> str:
    """File-name tag of one evaluation, e.g. ``step2500.beam4_alpha0.6`` or ``avg5_2100-2500.greedy``."""
    where = f"step{steps[0]}" if len(steps) == 1 else f"avg{len(steps)}_{steps[0]}-{steps[-1]}"
    if settings.method == "beam":
        how = f"beam{settings.beam_size}_alpha{settings.alpha:g}"
    elif settings.method == "sample":
        how = f"sample_t{settings.temperature:g}_k{settings.top_k}_p{settings.top_p:g}_seed{settings.seed}"
    else:
        how = "greedy"
    return f"{where}.{how}"


def _write_text(path: str, text: str) -> None:
    fileio.write_bytes_atomic(path, text.encode("utf-8"))


def format_table(rows: dict[str, float]) -> str:
    """A two-column table of metric names and values."""
    width = max(len(name) for name in rows)
    return "\n".join(f"{name:<{width}}  {value:9.2f}" for name, value in rows.items())


def main(argv: Sequence[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax logs each restore step (INFO) and read-only access (WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    settings = decode_settings_from_flags()
    loaded = load_workdir(_WORKDIR.value, checkpoint_step=_STEP.value, average_last=_AVERAGE.value, task=_TASK.value)
    config = loaded.config
    compile_cache.enable(config.get("compilation_cache_dir", ""))
    split = _SPLIT.value or config.get("eval_split", "validation")
    if split not in loaded.task.splits:
        raise app.UsageError(f"--split={split!r}: task {loaded.task.name} has splits {sorted(loaded.task.splits)}")
    start = time.perf_counter()
    result = evaluate_loaded(
        loaded,
        split,
        settings,
        _BATCH.value,
        max_examples=_MAX_EXAMPLES.value,
        data_dir=_DATA_DIR.value or None,  # None: the data_dir the workdir was trained with
        progress=True,
    )
    seconds = time.perf_counter() - start
    out_dir = fileio.workdir_path(_WORKDIR.value) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = str(out_dir / f"{split}.{run_tag(settings, loaded.steps)}")
    _write_text(f"{stem}.predictions.txt", "".join(p.replace("\n", " ") + "\n" for p in result.predictions))
    summary = {
        "task": loaded.task.name,
        "split": split,
        "checkpoint_steps": loaded.steps,
        "decoding": dataclasses.asdict(settings) | {"method": settings.describe()},
        "metrics": result.metrics,
        "signatures": result.signatures,
        "seconds": seconds,
    }
    _write_text(f"{stem}.json", json.dumps(summary, indent=2) + "\n")
    where = f"step {loaded.steps[0]}" if len(loaded.steps) == 1 else f"average of steps {loaded.steps}"
    print(f"{loaded.task.name} {split}: {int(result.metrics['examples'])} examples, {where}, {settings.describe()}")
    print(format_table({k: v for k, v in result.metrics.items() if k != "examples"}))
    for name, signature in result.signatures.items():
        print(f"{name} signature: {signature}")
    print(f"wrote {stem}.predictions.txt and {stem}.json ({seconds:.1f} s)")


def _cli() -> None:
    cli.run(main)


if __name__ == "__main__":
    _cli()
