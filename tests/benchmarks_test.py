"""The benchmark scripts that acceptance commands run still run (each at a toy size): a refactor of a library helper
they call (``train.model_config`` came to take a vocabulary size instead of a vocabulary) broke nmt_bench unnoticed."""

from __future__ import annotations

import json
import os
import shutil
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


def _run_quick(script: str, *arguments: str, **env: str) -> str:
    """stdout of ``experiments/benchmarks/SCRIPT`` run with ``arguments`` on the CPU; fails with its stderr."""
    out = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *arguments],
        env=cpu_subprocess_env(**env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_nmt_bench_times_t5x_lite_alone_without_fairseq(shared_data):
    stdout = _run_quick(
        "nmt_bench.py", "--updates", "2", "--rounds", "1", "--warmup", "1", T5X_LITE_DATA=str(shared_data)
    )
    assert "no --fairseq_python: timing t5x_lite alone (no ratio)" in stdout
    assert "t5x_lite: batch_tokens 4096" in stdout
    assert "round 1: t5x_lite " in stdout and "ratio (t5x_lite" not in stdout


def test_train_bench_quick_prints_both_sides_and_the_ratio():
    stdout = _run_quick("train_bench.py", "--quick")
    assert "t5_tiny, batch 4 x (32 in, 32 out)" in stdout
    assert "round 2/2: mean step time t5x_lite" in stdout and "Hugging Face" in stdout
    assert float(stdout.strip().splitlines()[-1].rpartition(": ")[2]) > 0  # ratio (t5x_lite / Hugging Face ...): X


def test_decode_bench_quick_decodes_as_hugging_face_does_and_prints_both_ratios():
    stdout = _run_quick("decode_bench.py", "--quick", "--repeats", "1")
    assert "greedy: identical greedy rows t5x_lite vs hf: 1.000" in stdout  # the same toy weights on both sides
    assert "beam4: identical top-beam rows t5x_lite vs hf: 1.000" in stdout
    assert float(stdout.split("greedy ratio t5x_lite/hf: ")[1].split("x")[0]) > 0
    assert float(stdout.split("beam4 ratio t5x_lite/hf: ")[1].split("x")[0]) > 0


def test_gpu_bench_quick_runs_every_kernel_without_an_error(tmp_path):
    """On the CPU too: the GPU deliverable's script still runs, each run recorded (an error is recorded, not raised,
    so the test reads the records)."""
    _run_quick("gpu_bench.py", "--quick", "--dtype", "float32", "--output", str(tmp_path / "runs.json"))
    with open(tmp_path / "runs.json") as f:
        runs = json.load(f)["runs"]
    assert [run["kernel"] for run in runs] == ["einsum", "xla"]
    assert all("error" not in run for run in runs), runs


def test_compression_bench_writes_a_row_per_model_with_the_int8_ratio(tiny_trained, tmp_path):
    workdir, _ = tiny_trained
    copy = shutil.copytree(workdir, tmp_path / "run")  # the bench writes RUN_quantized beside it: not the shared one
    out = tmp_path / "compression"
    stdout = _run_quick(
        "compression_bench.py",
        *("--workdir", str(copy), "--out", str(out), "--split", "validation", "--schemes", "int8"),
        *("--max_examples", "8", "--batch_size", "8", "--steps", "1", "--step_rows", "8", "--step_length", "8"),
    )
    assert "ratio (int8 / float32 decoding tokens/s): " in stdout.strip().splitlines()[-1]
    with open(f"{out}.json") as f:
        rows = json.load(f)["rows"]
    assert [row["model"] for row in rows] == ["float32", "int8"]
    assert rows[1]["param_bytes"] < rows[0]["param_bytes"] / 2  # int8 kernels, float scales and norms
