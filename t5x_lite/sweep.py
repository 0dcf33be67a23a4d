"""Run every point of a config file's ``sweep(add)``, one workdir each, then tabulate and plot them.

    python -m t5x_lite.sweep --config configs/demo.py:steps=30 --workdir_root DIR --parallel 2
    python -m t5x_lite.sweep --config configs/multi30k.py --workdir_root DIR --backend slurm --gpus_per_point 1
    python -m t5x_lite.sweep --config configs/demo.py --workdir_root gs://B/sweep --backend skypilot \\
        --accelerators H100:1 --dry_run
    python -m t5x_lite.sweep --workdir_root DIR --summarize

Every point is one ``python -m t5x_lite.train`` command: the config file with the point's options merged into
its ``:options`` part, and the point's other keys as ``--config.key=value`` flags (``docs/sweeps.md``). Its
workdir, ``DIR/<name>``, is named from the point's own keys and holds ``sweep_point.json`` (the command and
the resolved config), ``train.log``, ``sweep_status.json`` and what training writes. Running the same command
again skips finished points and resumes the others from their last checkpoint (training itself resumes).
Backends: ``local`` runs ``--parallel`` points at a time, each its own process pinned to its share of the CPU
cores (or given its own GPUs); ``slurm`` submits one job array through submitit; ``skypilot`` writes one task
YAML per point and launches each as a managed job. At the end, ``DIR/summary.md`` has one row per point, the
best by the config's ``best_metric`` marked, and ``DIR/curves.png`` that metric against step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from t5x_lite import config_files

POINT_FILE = "sweep_point.json"  # the planned command, the resolved config and the device share of a point
STATUS_FILE = "sweep_status.json"  # written when a point starts and when it ends
LOG_FILE = "train.log"
TAIL_LINES = 20


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: the config file's options it sets and its other (dotted) config keys."""

    name: str
    options: dict[str, Any]
    overrides: dict[str, Any]

    @property
    def keys(self) -> dict[str, Any]:
        return {**self.options, **self.overrides}


def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def point_name(keys: dict[str, Any]) -> str:
    """``{'learning_rate': 0.001, 'seed': 2}`` -> ``'learning_rate=0.001,seed=2'``: a workdir name that says
    what the point changes (characters a path or a shell would trip on become ``-``; over 120 characters, the
    name is cut and ends in a hash of the full one)."""
    text = ",".join(f"{key}={_format_value(value)}" for key, value in keys.items()) or "default"
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)
    if len(text) > 120:
        import hashlib

        text = text[:110] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def plan(spec: str) -> list[Point]:
    """The points of the sweep in config ``spec`` (``path[:options]``), split into options and overrides."""
    path, _ = config_files.split_spec(spec)
    options = config_files.file_options(path)
    points, names = [], set()
    for keys in config_files.sweep_points(spec):
        point = Point(
            name=point_name(keys),
            options={k: v for k, v in keys.items() if k in options},
            overrides={k: v for k, v in keys.items() if k not in options},
        )
        if point.name in names:
            raise ValueError(f"{path}: sweep(add) added the point {point.name!r} twice")
        names.add(point.name)
        points.append(point)
    return points


def _merge_options(arg: str | None, options: dict[str, Any]) -> str | None:
    """``'steps=30'`` and ``{'seed': 2}`` -> ``'steps=30,seed=2'`` (the point's value wins)."""
    merged = dict(part.partition("=")[::2] for part in filter(None, (arg or "").split(",")))
    merged.update({key: _format_value(value) for key, value in options.items()})
    return ",".join(f"{key}={value}" for key, value in merged.items()) if merged else arg


def _flag_value(value: Any) -> str:
    return str(value) if not isinstance(value, (list, tuple)) else "(" + ", ".join(map(str, value)) + ",)"


def point_config_spec(spec: str, point: Point) -> str:
    path, arg = config_files.split_spec(spec)
    arg = _merge_options(arg, point.options)
    return path if arg is None else f"{path}:{arg}"


def train_command(spec: str, point: Point, workdir: str, python: str = sys.executable) -> list[str]:
    """The ``python -m t5x_lite.train`` command line of ``point``."""
    command = [python, "-m", "t5x_lite.train", "--config", point_config_spec(spec, point), "--workdir", workdir]
    return command + [f"--config.{key}={_flag_value(value)}" for key, value in point.overrides.items()]


# ---------------------------------------------------------------------------------------------------------------
# Running one point (the same function locally and inside a SLURM job)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)


def log_tail(workdir: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a point's log (progress-bar redraws split into lines)."""
    try:
        with open(os.path.join(workdir, LOG_FILE), encoding="utf-8", errors="replace") as f:
            text = f.read()[-200_000:]
    except OSError:
        return ""
    rows = [row for row in re.split(r"[\r\n]+", text) if row.strip()]
    return "\n".join(rows[-lines:])


def run_point(workdir: str, cores: list[int] | None = None, gpus: list[int] | None = None) -> dict[str, Any]:
    """Run the command in ``workdir/sweep_point.json`` to its end; log to ``train.log``; return the status.

    ``cores``: pin the process to these CPU cores (XLA sizes its thread pool to them); ``gpus``: make only
    these GPUs visible. Inside a multi-task SLURM step every task trains; task 0 alone writes the status.
    """
    point = _read_json(os.path.join(workdir, POINT_FILE))
    if point is None:
        raise FileNotFoundError(f"{workdir} holds no readable {POINT_FILE}; plan the sweep again")
    writer = int(os.environ.get("SLURM_PROCID", "0")) == 0
    earlier = (_read_json(os.path.join(workdir, STATUS_FILE)) or {}).get("earlier_seconds", 0.0)
    status = {"status": "running", "command": point["command"], "started": time.time(), "host": os.uname()[1]}
    status["earlier_seconds"] = earlier  # a resumed point adds this launch's time to the earlier launches'
    if writer:
        _write_json(os.path.join(workdir, STATUS_FILE), status)
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores and hasattr(os, "sched_setaffinity") else None
    start = time.perf_counter()
    with open(os.path.join(workdir, LOG_FILE), "a", encoding="utf-8") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(point['command'])}\n")
        log.flush()
        returncode = subprocess.call(
            point["command"], cwd=point["cwd"], env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
    status.update(
        status="finished" if returncode == 0 else "failed",
        returncode=returncode,
        ended=time.time(),
        wall_seconds=earlier + time.perf_counter() - start,
    )
    status["earlier_seconds"] = status["wall_seconds"]
    if writer:
        _write_json(os.path.join(workdir, STATUS_FILE), status)
    return status


# ---------------------------------------------------------------------------------------------------------------
# Planning the workdirs


@dataclasses.dataclass
class Planned:
    point: Point
    workdir: str
    command: list[str]
    error: str = ""  # the point's config could not be built: it fails without training

    @property
    def state(self) -> str:
        """finished (by this same command), failed, interrupted (started, not ended), or new."""
        status = _read_json(os.path.join(self.workdir, STATUS_FILE)) or {}
        if status.get("status") == "finished" and status.get("command") == self.command:
            return "finished"
        if status.get("status") == "failed":
            return "failed"
        return "interrupted" if status else "new"


def prepare(
    spec: str, root: str, *, python: str = sys.executable, write: bool = True, remote: bool = False
) -> list[Planned]:
    """Each point's workdir under ``root`` with its ``sweep_point.json`` (when ``write``). ``remote``: the
    commands run on other machines (SkyPilot), so their workdirs stay as given, not made absolute here."""
    planned = []
    cwd = os.getcwd()
    for point in plan(spec):
        workdir = os.path.join(root, point.name)
        command = train_command(spec, point, workdir if remote else os.path.abspath(workdir), python)
        item = Planned(point, workdir, command)
        record: dict[str, Any] = {"name": point.name, "keys": point.keys, "command": command, "cwd": cwd}
        try:
            config = config_files.load_config(point_config_spec(spec, point), point.overrides)
            record.update(
                config=config.to_dict(), best_metric=config.best_metric, best_mode=config.get("best_mode", "min")
            )
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            item.error = f"{type(error).__name__}: {error}"
            record["error"] = item.error
        if write and not remote:
            os.makedirs(workdir, exist_ok=True)
            _write_json(os.path.join(workdir, POINT_FILE), record)
            if item.error:
                _write_json(
                    os.path.join(workdir, STATUS_FILE),
                    {"status": "failed", "returncode": None, "error": item.error, "command": command},
                )
        planned.append(item)
    return planned


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _visible_gpus() -> list[int]:
    """GPU indices this process may hand out: CUDA_VISIBLE_DEVICES, else what ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(sum(line.startswith("GPU ") for line in out.splitlines())))


def device_shares(parallel: int) -> list[dict[str, list[int] | None]]:
    """What each of ``parallel`` concurrent points gets: whole GPUs when there are any, else a share of the
    CPU cores (all of them to each when there are fewer cores than points)."""
    gpus = _visible_gpus()
    if gpus:
        if parallel > len(gpus):
            raise ValueError(f"--parallel {parallel} is more than the {len(gpus)} GPUs visible; lower it")
        each = len(gpus) // parallel
        return [{"gpus": gpus[i * each : (i + 1) * each], "cores": None} for i in range(parallel)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < parallel or not cores:
        return [{"gpus": None, "cores": None} for _ in range(parallel)]
    each = len(cores) // parallel
    return [{"gpus": None, "cores": cores[i * each : (i + 1) * each]} for i in range(parallel)]


def run_local(items: list[Planned], parallel: int) -> None:
    """``parallel`` points at a time, each a process of its own on its own device share."""
    slots: queue.Queue = queue.Queue()
    for share in device_shares(parallel):
        slots.put(share)

    def one(item: Planned) -> None:
        share = slots.get()
        try:
            where = f"GPUs {share['gpus']}" if share["gpus"] else f"cores {share['cores'] or 'all'}"
            print(f"[sweep] start {item.point.name} ({where}); log: {os.path.join(item.workdir, LOG_FILE)}")
            status = run_point(item.workdir, cores=share["cores"], gpus=share["gpus"])
            print(f"[sweep] {status['status']} {item.point.name} in {status['wall_seconds']:.0f} s")
        finally:
            slots.put(share)

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(one, item) for item in items]:
            future.result()


def run_slurm(items: list[Planned], root: str, args: argparse.Namespace) -> None:
    """One job array through submitit (``--slurm_cluster local``: its LocalExecutor, the same path here)."""
    try:
        import submitit
    except ImportError:
        raise SystemExit("--backend slurm needs submitit: pip install -e '.[launch]'") from None
    executor = submitit.AutoExecutor(folder=os.path.join(root, "_submitit"), cluster=args.slurm_cluster or None)
    parameters: dict[str, Any] = dict(
        name=args.job_name or os.path.basename(os.path.abspath(root)),
        timeout_min=args.timeout_min,
        nodes=args.nodes_per_point,
        tasks_per_node=max(1, args.gpus_per_point),  # one process per GPU (jax.distributed from SLURM's variables)
        gpus_per_node=args.gpus_per_point,
        cpus_per_task=args.cpus_per_point,
        slurm_array_parallelism=args.parallel,
    )
    if args.slurm_partition:
        parameters["slurm_partition"] = args.slurm_partition
    if executor.cluster == "local":
        parameters["tasks_per_node"] = 1  # the local executor runs single-process points
    executor.update_parameters(**parameters)
    jobs = executor.map_array(run_point, [os.path.abspath(item.workdir) for item in items])
    print(f"[sweep] submitted {len(jobs)} points as {executor.cluster} job(s) {', '.join(j.job_id for j in jobs)}")
    for item, job in zip(items, jobs, strict=True):
        try:
            status = job.result()
            print(f"[sweep] {status['status']} {item.point.name} (job {job.job_id})")
        except Exception as error:  # the job died before run_point could write its status
            print(f"[sweep] job {job.job_id} of {item.point.name} ended without a result: {error}")


SKYPILOT_MOUNT = "/t5x_lite_sweep"  # where a bucket --workdir_root is mounted on the SkyPilot machines


def skypilot_task(item: Planned, args: argparse.Namespace) -> dict[str, Any]:
    """A SkyPilot task (its YAML as a dict) that trains ``item`` from a copy of this repository.

    A bucket ``--workdir_root`` (``gs://``, ``s3://``) is mounted on every node at ``/t5x_lite_sweep``
    (SkyPilot's ``file_mounts``, mode MOUNT), and the point trains into its folder there, so checkpoints,
    metrics and logs land in the bucket.
    """
    accelerator = args.accelerators or ""
    extra = "tpu" if accelerator.lower().startswith("tpu") else ("gpu" if accelerator else "")
    command = list(item.command[1:])  # 'python' on the remote side
    task: dict[str, Any] = {
        "name": re.sub(r"[^a-z0-9-]", "-", f"{args.job_name or 't5x-lite'}-{item.point.name}".lower())[:60].strip("-"),
        "num_nodes": args.nodes_per_point,
        "resources": {"accelerators": accelerator} if accelerator else {},
        "workdir": ".",
    }
    root = item.workdir[: -len(item.point.name)].rstrip("/")
    if "://" in root:
        task["file_mounts"] = {SKYPILOT_MOUNT: {"source": root, "mode": "MOUNT"}}
        command[command.index("--workdir") + 1] = f"{SKYPILOT_MOUNT}/{item.point.name}"
    if args.data_dir:
        task["envs"] = {"T5X_LITE_DATA": args.data_dir}
    if args.cloud:
        task["resources"]["infra"] = args.cloud
    task["setup"] = f"pip install -e '.{f'[{extra}]' if extra else ''}'"
    # every node runs the same command; t5x_lite.train joins them (jax.distributed from SKYPILOT_NODE_*)
    task["run"] = "python " + shlex.join(command)
    return task


def run_skypilot(items: list[Planned], root: str, args: argparse.Namespace) -> list[str]:
    """Write one task YAML per point (under ``--yaml_dir``) and, unless ``--dry_run``, launch each."""
    import yaml

    out = args.yaml_dir or (os.path.join(root, "_skypilot") if "://" not in root else "skypilot_tasks")
    os.makedirs(out, exist_ok=True)
    paths = []
    for item in items:
        path = os.path.join(out, f"{item.point.name}.yaml")
        task = skypilot_task(item, args)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(task, f, sort_keys=False)
        paths.append(path)
        launch = ["sky", "jobs", "launch", "--yes", "--name", task["name"], path]
        print(f"[sweep] {'would run' if args.dry_run else 'launch'}: {shlex.join(launch)}")
        if not args.dry_run:
            if shutil.which("sky") is None:
                raise SystemExit("--backend skypilot needs the sky command: pip install -e '.[launch]'")
            subprocess.run(launch, check=True)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Summary


def _metrics_rows(workdir: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by an interruption
    except OSError:
        pass
    return rows


def collect(root: str) -> list[dict[str, Any]]:
    """One record per point workdir under ``root``: keys, status, steps, wall time, final and all eval rows."""
    records = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        workdir = os.path.join(root, name)
        point = _read_json(os.path.join(workdir, POINT_FILE))
        if point is None:
            continue
        status = _read_json(os.path.join(workdir, STATUS_FILE)) or {"status": "not started"}
        rows = _metrics_rows(workdir)
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        final = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")}
        records.append(
            dict(
                name=name,
                workdir=workdir,
                keys=point.get("keys", {}),
                best_metric=point.get("best_metric"),  # None: the point's config could not be built
                best_mode=point.get("best_mode"),
                status=status,
                steps=max((r.get("step", 0) for r in rows), default=0),
                final=final,
                evals=evals,
            )
        )
    return records


def _ranking(records: list[dict[str, Any]]) -> tuple[str, str]:
    """The config's ``best_metric`` and ``best_mode``, from the first point whose config could be built."""
    for r in records:
        if r["best_metric"]:
            return r["best_metric"], r["best_mode"] or "min"
    return "eval/loss", "min"


def _best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    metric, mode = _ranking(records)
    scored = [
        r for r in records if isinstance(r["final"].get(metric), (int, float)) and math.isfinite(r["final"][metric])
    ]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r["final"][metric])


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarize(root: str) -> str:
    """Write ``root/summary.md`` (and ``root/curves.png`` when matplotlib is there); return the table."""
    records = collect(root)
    if not records:
        raise SystemExit(f"{root} holds no sweep point (no */{POINT_FILE}); run a sweep into it first")
    (metric, mode), best = _ranking(records), _best(records)
    bookkeeping = ("_best", "evals_without_improvement")  # early-stopping state, not results
    columns = sorted({k for r in records for k in r["final"] if not k.endswith(bookkeeping)})
    if metric in columns:
        columns.remove(metric)
        columns.insert(0, metric)
    head = ["point", "status", "steps", "wall", *columns]
    lines = [
        f"# Sweep summary: {os.path.abspath(root)}",
        "",
        f"{len(records)} points; best by `{metric}` ({mode}): "
        + (f"**{best['name']}**" if best else "none has it yet"),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in records:
        status = r["status"]
        state = status.get("status", "?")
        if state == "failed":
            state = f"failed (exit status {status.get('returncode')})" + (
                ": config error" if status.get("error") else ""
            )
        wall = f"{status['wall_seconds']:.0f} s" if "wall_seconds" in status else "-"
        name = f"**{r['name']}** (best)" if best is r else r["name"]
        cells = [name, state, str(r["steps"]), wall] + [_cell(r["final"].get(c, "-")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in records if r["status"].get("status") == "failed"]
    for r in failed:
        tail = r["status"].get("error") or log_tail(r["workdir"])
        lines += ["", f"## {r['name']}: failed", "", "```", tail, "```"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    _plot_curves(records, metric, os.path.join(root, "curves.png"))
    return text


def _plot_curves(records: list[dict[str, Any]], metric: str, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[sweep] {path} not drawn: matplotlib is missing (pip install -e '.[plot]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        points = [(row["step"], row[metric]) for row in r["evals"] if metric in row]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m t5x_lite.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="config file with a sweep(add), and its options: configs/demo.py:steps=30")
    parser.add_argument("--workdir_root", required=True, help="one workdir per point is made under it")
    parser.add_argument("--backend", choices=("local", "slurm", "skypilot"), default="local")
    parser.add_argument("--parallel", type=int, default=1, help="points at a time (local), array parallelism (slurm)")
    parser.add_argument("--dry_run", action="store_true", help="print what would run; start nothing")
    parser.add_argument("--summarize", action="store_true", help="only write summary.md and curves.png")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of each point's train command")
    parser.add_argument("--job_name", default="", help="SLURM job / SkyPilot task name prefix")
    parser.add_argument("--gpus_per_point", type=int, default=0, help="slurm: GPUs (and processes) per node")
    parser.add_argument("--nodes_per_point", type=int, default=1, help="slurm / skypilot: nodes per point")
    parser.add_argument("--cpus_per_point", type=int, default=2, help="slurm: CPUs per task")
    parser.add_argument("--timeout_min", type=int, default=24 * 60, help="slurm: time limit of each point")
    parser.add_argument("--slurm_partition", default="")
    parser.add_argument("--slurm_cluster", default="", help="submitit cluster: '' detects; 'local' runs here")
    parser.add_argument("--accelerators", default="", help="skypilot: e.g. H100:8 or tpu-v5p-8")
    parser.add_argument("--cloud", default="", help="skypilot: infra, e.g. gcp or gcp/us-central2")
    parser.add_argument("--data_dir", default="", help="skypilot: T5X_LITE_DATA on the remote machines")
    parser.add_argument("--yaml_dir", default="", help="skypilot: where task YAMLs go (default DIR/_skypilot)")
    args = parser.parse_args(argv)
    if not args.summarize and not args.config:
        parser.error("--config is required unless --summarize")
    if args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir_root
    if args.summarize:
        print(summarize(root))
        return 0
    remote = "://" in root
    if remote and args.backend != "skypilot":
        raise SystemExit(f"--workdir_root {root}: a bucket path needs --backend skypilot (the machines write it)")
    skypilot = args.backend == "skypilot"
    try:
        items = prepare(args.config, root, python=args.python, write=not (args.dry_run or skypilot), remote=skypilot)
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"t5x_lite.sweep: {error}") from None
    states = {item.point.name: ("config error" if item.error else item.state) for item in items}
    todo = [item for item in items if not item.error and states[item.point.name] != "finished"]
    for item in items:
        print(f"[sweep] {item.point.name}: {states[item.point.name]}" + (f" ({item.error})" if item.error else ""))
    if skypilot:
        run_skypilot(todo, root, args)
        return 0
    if args.dry_run:
        for item in todo:
            print(f"[sweep] would run: {shlex.join(item.command)}")
        return 0
    if not todo:
        print(
            f"[sweep] all {len(items) - sum(bool(i.error) for i in items)} runnable points are finished; nothing to run"
        )
    elif args.backend == "local":
        run_local(todo, args.parallel)
    else:
        run_slurm(todo, root, args)
    print(summarize(root))
    failed = [r for r in collect(root) if r["status"].get("status") != "finished"]
    for r in failed:
        status = r["status"]
        print(f"[sweep] {r['name']} did not finish ({status.get('status')}, exit status {status.get('returncode')}):")
        print(status.get("error") or log_tail(r["workdir"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
