"""The train command as a process: kill -9 and resume, SIGTERM saves the current step, two processes (gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from t5x_lite import checkpoints, metrics
from tests.conftest import cpu_subprocess_env

CONFIG = os.path.join(os.path.dirname(__file__), "tiny_config.py")


def _command(workdir, config_arg: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "t5x_lite.train",
        f"--config={CONFIG}:{config_arg}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _env(tmp_path, **extra) -> dict[str, str]:
    return cpu_subprocess_env(**extra)


def _run(command, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _cache(tmp_path) -> str:
    return f"--config.vocab_cache_dir={tmp_path / 'vocab'}"


def test_kill_9_then_resume_equals_straight_run(tmp_path):
    env = _env(tmp_path)
    common = (
        "--config.checkpoint_every_steps=20",
        "--config.log_every_steps=5",
        "--config.decay_steps=40",
        _cache(tmp_path),
    )
    straight = _run(_command(tmp_path / "straight", "steps=40", *common), env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # Under the final metrics: three test examples (input, prediction, reference) from the predictions file
    # that every evaluation writes; and none of orbax's "read only" notices from loading checkpoints.
    tail = straight.stdout[straight.stdout.index("final evaluation:") :]
    assert "3 examples of test_step40.jsonl:" in tail
    assert tail.count("  input:") == 3 and tail.count("  prediction:") == 3 and tail.count("  reference:") == 3
    with open(tmp_path / "straight" / "predictions" / "test_step40.jsonl") as f:
        assert len(f.readlines()) == 16  # tiny_config: eval_examples 16
    crashed = _run(_command(tmp_path / "killed", "steps=40", *common, "--config.debug_crash_after_step=20"), env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    resumed = _run(_command(tmp_path / "killed", "steps=40", *common), env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 20" in resumed.stdout
    a = checkpoints.load_params(tmp_path / "straight", step=40)
    b = checkpoints.load_params(tmp_path / "killed", step=40)
    jax.tree.map(np.testing.assert_array_equal, b, a)
    # The same batches: the per-window fingerprints of the data agree step for step.
    seen = lambda workdir: {
        r["step"]: r["data/fingerprint"] for r in metrics.read_metrics(workdir) if "data/fingerprint" in r
    }
    straight_seen, resumed_seen = seen(tmp_path / "straight"), seen(tmp_path / "killed")
    assert sorted(resumed_seen) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(resumed_seen[s] == straight_seen[s] for s in resumed_seen)

    # Killed after step 30 with its checkpoint then damaged on disk (a flipped byte): the resume warns, moves step 30
    # aside, goes back to step 20, and still ends equal to the straight run; metrics.jsonl has each step once.
    every_10 = [arg for arg in common if "checkpoint_every_steps" not in arg]
    every_10 += ["--config.checkpoint_every_steps=10", "--config.keep_checkpoints=5"]
    damaged = tmp_path / "damaged"
    crashed = _run(_command(damaged, "steps=40", *every_10, "--config.debug_crash_after_step=30"), env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    data_files = [p for p in (damaged / "checkpoints" / "30" / "state").glob("**/d/*") if p.is_file()]
    largest = max(data_files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10
    largest.write_bytes(bytes(data))
    resumed = _run(_command(damaged, "steps=40", *every_10), env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"warning: checkpoint {damaged / 'checkpoints' / '30'} is corrupt" in resumed.stderr
    assert "resuming from step 20" in resumed.stdout and (damaged / "checkpoints.corrupt" / "30").is_dir()
    jax.tree.map(np.testing.assert_array_equal, checkpoints.load_params(damaged, step=40), a)
    logged = [r["step"] for r in metrics.read_metrics(damaged) if "train/loss" in r]
    assert logged == [5, 10, 15, 20, 25, 30, 35, 40]  # 25 and 30 of the killed run are superseded, not doubled
    superseded = [json.loads(line) for line in (damaged / "metrics.superseded.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in superseded if "train/loss" in r}) == [25, 30]


def test_sigterm_saves_the_current_step(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        _command(
            workdir,
            "steps=100000",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1000",
            _cache(tmp_path),
        ),
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and len(metrics.read_metrics(workdir)) >= 5:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    step = checkpoints.Checkpointer(workdir, save_every_steps=1000).latest_step()
    last_logged = max(r["step"] for r in metrics.read_metrics(workdir))
    assert step is not None and step >= 5 and step % 1000 != 0 and step >= last_logged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    common = (
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1000",
        "--config.eval_every_steps=1000",
        "--config.mesh_shape=(2,1,1)",
        "--config.pack=False",  # unpacked rows: the two processes together read exactly the 1-process batch
        _cache(tmp_path),
    )
    one = _run(
        _command(tmp_path / "one", "steps=10", *common),
        _env(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
    )
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    processes = [
        subprocess.Popen(
            _command(
                tmp_path / "two",
                "steps=10",
                *common,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in processes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    loss = lambda workdir: [r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
    np.testing.assert_allclose(loss(tmp_path / "two"), loss(tmp_path / "one"), rtol=1e-5)
    assert len(loss(tmp_path / "one")) == 10


def test_sigterm_to_one_of_two_processes_makes_both_save_the_same_step_and_exit_0(tmp_path):
    workdir, port = tmp_path / "two", _free_port()
    common = (
        "steps=100000",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1000",
        "--config.eval_every_steps=1000",
        "--config.mesh_shape=(2,1,1)",
        "--config.pack=False",
        _cache(tmp_path),
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    )
    processes = [
        subprocess.Popen(
            _command(workdir, *common, f"--process_id={i}"),
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (workdir / "metrics.jsonl").exists() and len(metrics.read_metrics(workdir)) >= 5
    ):
        time.sleep(0.5)
    processes[1].send_signal(signal.SIGTERM)  # not the chief: the one that writes metrics and is told last
    saved = []
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr[-3000:]
        line = [line for line in stderr.splitlines() if line.startswith("preemption: saved step ")]
        assert line, stderr[-3000:]
        saved.append(int(line[0].split()[3]))
    assert saved[0] == saved[1] >= 5  # both joined the same collective save
    assert checkpoints.Checkpointer(workdir, save_every_steps=1000, read_only=True).all_steps() == [saved[0]]


BAD_CONFIGS = [  # (arguments, what the one-line error says)
    (["--config.learning_rat=0.1"], "--config.learning_rat: the config has no key 'learning_rat' (did you mean"),
    (["--config.model_overrides.d_modl=8"], "--config.model_overrides.d_modl: the config has no key 'd_modl'"),
    (["--config.learning_rate=fast"], "flag --config.learning_rate=fast: could not convert string to float"),
    (["--config.num_train_steps=1.5"], "flag --config.num_train_steps=1.5: invalid literal for int()"),
    (["--config.model_overrides.d_model=-8"], "TransformerConfig.d_model=-8: must be a positive integer"),
]


def test_bad_config_input_is_one_line_and_exit_status_2(tmp_path):
    """A mistyped key, a wrong value type, a config file that raises, an unknown config option, a missing config
    file: each one line on stderr, status 2, and nothing compiled (no checkpoints, no metrics)."""
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise RuntimeError('no such dataset on this machine')\n")
    cases = [(_command(tmp_path / "run", "steps=2", *args), message) for args, message in BAD_CONFIGS] + [
        (
            [sys.executable, "-m", "t5x_lite.train", f"--config={raising}", f"--workdir={tmp_path / 'run'}"],
            f"the config file {raising} raised RuntimeError: no such dataset on this machine",
        ),
        (_command(tmp_path / "run", "stepz=2"), "tiny_config.py: unknown options ['stepz']"),
        (
            [sys.executable, "-m", "t5x_lite.train", "--config=configs/missing.py", f"--workdir={tmp_path / 'run'}"],
            "--config: [Errno 2] No such file or directory: 'configs/missing.py'",
        ),
    ]
    env = _env(tmp_path)
    for command, message in cases:
        done = _run(command + [_cache(tmp_path)], env, timeout=120)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (command, done.stderr)
        assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
