"""Workdir paths that are local directories or bucket URLs (``gs://``, ``s3://``): one ``etils.epath.Path`` for both.

Checkpoints go through Orbax, which reads and writes buckets itself; everything else a run keeps in its workdir
(config.json, metrics.jsonl, the vocabulary, predictions, TensorBoard events) goes through these helpers. A bucket
needs the filesystem package of its scheme (``pip install -e '.[gcs]'`` for ``gs://``: gcsfs)."""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store (``gs://bucket/run``) rather than a local file."""
    return "://" in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URL as it is, a local path made absolute (``~`` expanded)."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends ``text`` to a file. Objects in a bucket cannot be appended to: there the file is rewritten whole
    (the files appended to, such as metrics.jsonl, stay small)."""
    target = workdir_path(path)
    if not is_url(target):
        with open(target, "a", encoding="utf-8") as f:
            f.write(text)
        return
    before = target.read_text(encoding="utf-8") if target.exists() else ""
    target.write_text(before + text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` so that readers see the old file or the new one, never half of it: a local file through a
    temporary file and a rename; an object in a bucket is replaced whole by the store itself."""
    target = workdir_path(path)
    if is_url(target):
        target.write_bytes(data)
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class MirroredDirectory:
    """A local directory whose files are copied to ``destination`` on ``sync()``: for writers that only write
    local files (TensorBoard's event writer). A local ``destination`` is used directly, with nothing to copy."""

    def __init__(self, destination: str | os.PathLike) -> None:
        self.destination = workdir_path(destination)
        self._staging = tempfile.mkdtemp(prefix="t5x_lite_mirror_") if is_url(self.destination) else None
        self.local = self._staging or os.fspath(self.destination)

    def sync(self) -> None:
        """Uploads every local file that changed (all of them: event files are small) to the destination."""
        if self._staging is None:
            return
        for root, _, names in os.walk(self._staging):
            for name in names:
                source = os.path.join(root, name)
                target = self.destination / os.path.relpath(source, self._staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(source, "rb") as f:
                    target.write_bytes(f.read())

    def close(self) -> None:
        self.sync()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
