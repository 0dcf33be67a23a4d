"""Sweeps declared in config files (``sweep(add)``) and ``python -m t5x_lite.sweep`` on its three backends.

The end-to-end runs train ``tests/tiny_config.py`` (12-15 steps) in child processes, as a user's sweep does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from t5x_lite import config_files, sweep
from tests.conftest import REPO_ROOT, cpu_subprocess_env

TINY = os.path.join(REPO_ROOT, "tests", "tiny_config.py")

# Two good points (one of them sets the file's own option `steps`), a point whose training fails (an unknown
# model preset: a non-zero exit status) and a point whose config cannot be built (a misspelt key: no training at all).
SWEEP_CONFIG = f'''
from t5x_lite import config_files

OPTIONS = {{"steps": 12}}


def get_config(arg=None):
    options = config_files.parse_options(arg, OPTIONS, "sweep_config.py")
    return config_files.load_config("{TINY}:steps=" + str(options["steps"]))


def sweep(add, options):
    add(learning_rate=3e-3)
    add(learning_rate=1e-2, steps=options["steps"] + 3)
    add(model="no_such_model")
    add(lerning_rate=1.0)
'''


@pytest.fixture
def sweep_config(tmp_path):
    path = tmp_path / "sweep_config.py"
    path.write_text(SWEEP_CONFIG)
    return str(path)


def _sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "t5x_lite.sweep", *args],
        cwd=REPO_ROOT,
        env=cpu_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _json(*parts: str) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _text(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def _status(root, name: str) -> dict:
    return _json(root, name, sweep.STATUS_FILE)


# --------------------------------------------------------------------------------------------------------------
# Config files: options, overrides, sweep points


def test_demo_and_multi30k_declare_sweeps():
    demo = sweep.plan(os.path.join(REPO_ROOT, "configs", "demo.py") + ":steps=30")
    assert len(demo) >= 3 and all(set(p.overrides) == {"learning_rate"} for p in demo)
    seeds = sweep.plan(os.path.join(REPO_ROOT, "configs", "multi30k.py"))
    assert [p.options for p in seeds] == [{"seed": 1}, {"seed": 2}, {"seed": 3}]  # `seed` is a file option


def test_plan_splits_options_from_config_keys_and_names_points(sweep_config):
    points = sweep.plan(sweep_config + ":steps=20")
    assert [p.name for p in points] == [
        "learning_rate=0.003",
        "learning_rate=0.01,steps=23",  # sweep(add, options) saw steps=20 from the :options part
        "model=no_such_model",
        "lerning_rate=1.0",
    ]
    assert points[1].options == {"steps": 23} and points[1].overrides == {"learning_rate": 0.01}
    command = sweep.train_command(sweep_config + ":steps=20", points[1], "/w", python="python")
    assert command == [
        "python", "-m", "t5x_lite.train", "--config", sweep_config + ":steps=23", "--workdir", "/w",
        "--config.learning_rate=0.01",
    ]  # fmt: skip


def test_point_names_are_safe_and_bounded():
    assert sweep.point_name({"model_overrides.dropout_rate": 0.1}) == "model_overrides.dropout_rate=0.1"
    assert sweep.point_name({"task": "a/b c"}) == "task=a-b-c"
    long = sweep.point_name({f"key{i}": "x" * 20 for i in range(10)})
    assert len(long) <= 120 and long != sweep.point_name({f"key{i}": "y" * 20 for i in range(10)})


def test_load_config_applies_overrides_and_rejects_unknown_keys():
    demo = os.path.join(REPO_ROOT, "configs", "demo.py")
    config = config_files.load_config(demo + ":steps=7", {"learning_rate": 0.5, "model_overrides.dropout_rate": 0.2})
    assert (config.num_train_steps, config.learning_rate, config.model_overrides.dropout_rate) == (7, 0.5, 0.2)
    with pytest.raises(KeyError, match="unknown config key 'lerning_rate'"):
        config_files.load_config(demo, {"lerning_rate": 1.0})
    with pytest.raises(KeyError, match="unknown config key 'model_overrides.num_headz'"):
        config_files.load_config(demo, {"model_overrides.num_headz": 2})  # the train command's flags refuse it too
    # any TransformerConfig field is a key, set or not (model_overrides() holds unset placeholders)
    config = config_files.load_config(demo, {"model_overrides.num_heads": 2, "model_overrides.d_kv": 8})
    assert config_files.given_model_overrides(config) == {"dropout_rate": 0.0, "num_heads": 2, "d_kv": 8}
    with pytest.raises(ValueError, match="unknown option 'stepz'; known: steps, batch_size"):
        config_files.load_config(demo + ":stepz=3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_files.load_config("configs/no_such_file.py")


def test_parse_options_types_booleans_and_rejects_bad_values():
    defaults = {"flag": False, "steps": 10}
    assert config_files.parse_options("flag=False,steps=3", defaults, "f.py") == {"flag": False, "steps": 3}
    assert config_files.parse_options("flag=true", defaults, "f.py")["flag"] is True
    with pytest.raises(ValueError, match="not a boolean"):
        config_files.parse_options("flag=maybe", defaults, "f.py")
    with pytest.raises(ValueError, match="steps='ten' is not a int"):
        config_files.parse_options("steps=ten", defaults, "f.py")


def test_a_config_without_sweep_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("def get_config(arg=None):\n    return None\n")
    with pytest.raises(ValueError, match=r"defines no sweep\(add\)"):
        sweep.plan(str(path))
    result = _sweep("--config", str(path), "--workdir_root", str(tmp_path / "root"), timeout=120)
    assert result.returncode != 0 and "defines no sweep(add)" in result.stderr


def test_device_shares_split_the_cores(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert [s["cores"] for s in sweep.device_shares(2)] == [[0, 1], [2, 3]]
    assert [s["cores"] for s in sweep.device_shares(8)] == [None] * 8  # fewer cores than points: all to each
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert [s["gpus"] for s in sweep.device_shares(2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="more than the 4 GPUs"):
        sweep.device_shares(5)


# --------------------------------------------------------------------------------------------------------------
# End to end: local backend, re-run, resume, summary


def test_local_sweep_runs_points_reports_failures_and_skips_finished_ones(sweep_config, tmp_path):
    root = str(tmp_path / "root")
    first = _sweep("--config", sweep_config, "--workdir_root", root, "--parallel", "2")
    assert first.returncode == 1, first.stdout + first.stderr  # two points failed; the others' results stand
    good = ["learning_rate=0.003", "learning_rate=0.01,steps=15"]
    for name in good:
        status = _status(root, name)
        assert status["status"] == "finished" and status["returncode"] == 0
        point = _json(root, name, sweep.POINT_FILE)
        assert point["config"]["learning_rate"] in (3e-3, 1e-2)  # the resolved config is kept with the point
    assert _json(root, good[1], sweep.POINT_FILE)["config"]["num_train_steps"] == 15
    failed = _status(root, "model=no_such_model")
    assert failed["status"] == "failed" and failed["returncode"] not in (0, None)
    assert f"exit status {failed['returncode']}" in first.stdout and "no_such_model" in first.stdout  # + log tail
    config_error = _status(root, "lerning_rate=1.0")
    assert config_error["status"] == "failed" and "unknown config key 'lerning_rate'" in config_error["error"]

    summary = _text(root, "summary.md")
    assert "(best)" in summary and f"failed (exit status {failed['returncode']})" in summary
    assert "config error" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "point" not in line]
    assert len(rows) == 4
    assert os.path.getsize(os.path.join(root, "curves.png")) > 1000

    # Again: the finished points are skipped (their logs do not grow); the failed ones are tried again.
    log_sizes = {name: os.path.getsize(os.path.join(root, name, sweep.LOG_FILE)) for name in good}
    second = _sweep("--config", sweep_config, "--workdir_root", root, "--parallel", "2")
    assert second.returncode == 1
    assert "learning_rate=0.003: finished" in second.stdout
    assert {name: os.path.getsize(os.path.join(root, name, sweep.LOG_FILE)) for name in good} == log_sizes

    # A point left "running" by a killed sweep is resumed: training continues from its checkpoint.
    status_path = os.path.join(root, good[0], sweep.STATUS_FILE)
    status = _json(status_path)
    status.update(status="running")
    with open(status_path, "w") as f:
        json.dump(status, f)
    third = _sweep("--config", sweep_config, "--workdir_root", root)
    assert f"{good[0]}: interrupted" in third.stdout and f"{good[1]}: finished" in third.stdout
    assert _status(root, good[0])["status"] == "finished"
    assert os.path.getsize(os.path.join(root, good[0], sweep.LOG_FILE)) > log_sizes[good[0]]

    # --summarize alone rewrites the table without a config.
    os.remove(os.path.join(root, "summary.md"))
    assert sweep.main(["--workdir_root", root, "--summarize"]) == 0
    assert "(best)" in _text(root, "summary.md")


def test_dry_run_starts_nothing(sweep_config, tmp_path):
    root = str(tmp_path / "root")
    result = _sweep("--config", sweep_config, "--workdir_root", root, "--dry_run", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("would run: ") == 3 and "lerning_rate=1.0: config error" in result.stdout
    assert not os.path.exists(root)


# --------------------------------------------------------------------------------------------------------------
# SLURM (submitit's LocalExecutor) and SkyPilot (task YAMLs)


def test_slurm_backend_runs_the_points_through_submitit(tmp_path):
    pytest.importorskip("submitit", reason="submitit is in the dev and launch extras: pip install -e '.[dev]'")
    config = tmp_path / "two.py"
    config.write_text(SWEEP_CONFIG.replace('    add(model="no_such_model")\n    add(lerning_rate=1.0)\n', ""))
    root = str(tmp_path / "root")
    result = _sweep("--config", str(config), "--workdir_root", root, "--backend", "slurm", "--slurm_cluster", "local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted 2 points as local job(s)" in result.stdout
    for name in ("learning_rate=0.003", "learning_rate=0.01,steps=15"):
        assert _status(root, name)["status"] == "finished"
    assert os.path.isdir(os.path.join(root, "_submitit"))


def test_skypilot_dry_run_writes_task_yamls(sweep_config, tmp_path):
    yaml_dir = tmp_path / "tasks"
    args = ["--config", sweep_config, "--workdir_root", "gs://bucket/sweep", "--backend", "skypilot"]
    args += ["--accelerators", "tpu-v5p-8", "--nodes_per_point", "2", "--dry_run", "--yaml_dir", str(yaml_dir)]
    result = _sweep(*args, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("would run: sky jobs launch --yes --name ") == 3
    tasks = {path.name: yaml.safe_load(path.read_text()) for path in yaml_dir.glob("*.yaml")}
    assert sorted(tasks) == ["learning_rate=0.003.yaml", "learning_rate=0.01,steps=15.yaml", "model=no_such_model.yaml"]
    task = tasks["learning_rate=0.01,steps=15.yaml"]
    assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "tpu-v5p-8"}
    assert task["setup"] == "pip install -e '.[tpu]'"
    assert task["run"].startswith("python -m t5x_lite.train --config ")
    assert task["file_mounts"] == {"/t5x_lite_sweep": {"source": "gs://bucket/sweep", "mode": "MOUNT"}}
    assert "--workdir /t5x_lite_sweep/learning_rate=0.01,steps=15 --config.learning_rate=0.01" in task["run"]

    sky_schemas = pytest.importorskip(
        "sky.utils.schemas", reason="SkyPilot (the launch extra) is not installed: pip install -e '.[launch]'"
    )
    from sky.utils import common_utils

    for task in tasks.values():
        common_utils.validate_schema(task, sky_schemas.get_task_schema(), "invalid task YAML: ")
        common_utils.validate_schema(task["resources"], sky_schemas.get_resources_schema(), "invalid resources: ")
    bad = dict(task, num_nodes="two")
    with pytest.raises(Exception, match="num_nodes"):
        common_utils.validate_schema(bad, sky_schemas.get_task_schema(), "invalid task YAML: ")


def test_a_bucket_workdir_root_needs_skypilot(sweep_config):
    result = _sweep("--config", sweep_config, "--workdir_root", "gs://bucket/sweep", timeout=120)
    assert result.returncode != 0 and "needs --backend skypilot" in result.stderr


def test_skypilot_run_command_is_one_line_per_node():
    command = ["python", "-m", "t5x_lite.train", "--workdir", "runs/p", "--x", "a b"]
    item = sweep.Planned(sweep.Point("p", {}, {"task": "a b"}), "runs/p", command)
    args = sweep.parse_args(["--config", "c.py", "--workdir_root", "runs", "--backend", "skypilot"])
    task = sweep.skypilot_task(item, args)
    assert task["run"] == "python -m t5x_lite.train --workdir runs/p --x 'a b'"
    assert "file_mounts" not in task  # a relative root is a path on the remote machine
    assert "accelerators" not in task["resources"]
    assert task["setup"] == "pip install -e '.'"


def test_launch_recipes_are_valid():
    launch = os.path.join(REPO_ROOT, "experiments", "launch")
    for script in ("slurm_gpu.sbatch", "tpu_vm_gcloud.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(launch, script)]).returncode == 0, script
    tasks = {name: yaml.safe_load(_text(launch, name)) for name in ("tpu_vm.yaml", "gpu_nodes.yaml")}
    assert "python -m t5x_lite.train" in tasks["tpu_vm.yaml"]["run"] and tasks["gpu_nodes.yaml"]["num_nodes"] == 2
    for task in tasks.values():  # the workdir is the bucket URL itself (tests/fileio_test.py), installed with gcs
        assert task["envs"]["BUCKET"].startswith("gs://") and "--workdir $BUCKET/runs/" in task["run"]
        assert "gcs" in task["setup"]
    sky_schemas = pytest.importorskip(
        "sky.utils.schemas", reason="SkyPilot (the launch extra) is not installed: pip install -e '.[launch]'"
    )
    from sky.utils import common_utils

    for name, task in tasks.items():
        common_utils.validate_schema(task, sky_schemas.get_task_schema(), f"{name}: ")
        common_utils.validate_schema(task["resources"], sky_schemas.get_resources_schema(), f"{name}: ")


def test_summary_ranks_by_the_configs_metric_even_after_a_config_error(tmp_path):
    def point(name, record, status, rows=()):
        os.makedirs(tmp_path / name)
        (tmp_path / name / sweep.POINT_FILE).write_text(json.dumps({"keys": {}, **record}))
        (tmp_path / name / sweep.STATUS_FILE).write_text(json.dumps(status))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    point("a=bad", {"error": "KeyError: unknown config key"}, {"status": "failed", "returncode": None, "error": "x"})
    ranked = {"best_metric": "eval/tok_bleu", "best_mode": "max"}
    done = {"status": "finished", "returncode": 0, "wall_seconds": 5.0}
    point("b=1", ranked, done, [{"step": 10, "eval/tok_bleu": 30.0, "eval/loss": 1.0}])
    point("c=2", ranked, {"status": "running"})  # interrupted before its first evaluation: not ranked
    point("d=3", ranked, done, [{"step": 10, "eval/tok_bleu": 32.0, "eval/loss": 0.5}])
    text = sweep.summarize(str(tmp_path))
    assert "best by `eval/tok_bleu` (max): **d=3**" in text
    assert "| **d=3** (best) | finished | 10 | 5 s | 32 |" in text
    assert "failed (exit status None): config error" in text
