"""The benchmark scripts that acceptance commands run still run: a refactor of a library helper they call
(``train.model_config`` came to take a vocabulary size instead of a vocabulary) broke nmt_bench unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT, cpu_subprocess_env

BENCHMARKS = os.path.join(REPO_ROOT, "experiments", "benchmarks")


def test_nmt_bench_gives_fairseq_the_train_commands_model_and_recipe():
    sys.path.insert(0, BENCHMARKS)
    try:
        import nmt_bench
    finally:
        sys.path.remove(BENCHMARKS)
    from t5x_lite import config_files

    config = config_files.load_config(nmt_bench.MULTI30K)
    arguments = nmt_bench.fairseq_arguments(config, 8000, "bin", 4096, 3)
    value = {name: arguments[i + 1] for i, name in enumerate(arguments[:-1]) if name.startswith("--")}
    assert arguments[0] == "bin"
    assert (value["--encoder-layers"], value["--decoder-layers"]) == ("4", "4")  # transformer_tiny
    assert (value["--encoder-embed-dim"], value["--encoder-ffn-embed-dim"]) == ("128", "256")
    assert value["--encoder-attention-heads"] == "4"
    assert (value["--dropout"], value["--attention-dropout"], value["--activation-dropout"]) == ("0.3", "0.0", "0.0")
    assert (value["--lr"], value["--warmup-updates"], value["--label-smoothing"]) == ("0.005", "2000", "0.1")
    assert (value["--max-tokens"], value["--seed"]) == ("4096", "3")


def test_nmt_bench_times_t5x_lite_alone_without_fairseq(shared_data):
    out = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "nmt_bench.py"), "--updates", "2", "--rounds", "1", "--warmup", "1"],
        env=cpu_subprocess_env(T5X_LITE_DATA=str(shared_data)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no --fairseq_python: timing t5x_lite alone (no ratio)" in out.stdout
    assert "t5x_lite: batch_tokens 4096" in out.stdout
    assert "round 1: t5x_lite " in out.stdout and "ratio (t5x_lite" not in out.stdout
