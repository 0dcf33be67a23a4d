"""Where the local corpora live: an explicit path, else ``$T5X_LITE_DATA``, else ``../shared/data`` beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "T5X_LITE_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root(explicit: str | os.PathLike | None = None, *, must_exist: bool = True) -> Path:
    """The directory holding multi30k/, wmt14_en_de/, ... (see ../shared/data/README.md)."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("the data_dir option", Path(explicit)))
    elif os.environ.get(ENV_VAR):
        candidates.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    else:
        candidates += [("../shared/data beside the repo", _REPO_ROOT.parent / "shared" / "data")]
        candidates += [("../shared/data from the working directory", Path.cwd().parent / "shared" / "data")]
    for _, path in candidates:
        if path.is_dir():
            return path.resolve()
    if not must_exist:
        return candidates[0][1]
    tried = "; ".join(f"{what}: {path}" for what, path in candidates)
    raise FileNotFoundError(
        f"data directory not found ({tried}); set {ENV_VAR}=/path/to/shared/data or pass data_dir=... in the config"
    )
