"""Where installed models live: ``<data dir>/jishi/models/<name>``."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def data_dir(prefix: str | os.PathLike | None = None) -> Path:
    if prefix:
        return Path(prefix)
    if os.environ.get("JISHI_HOME"):
        return Path(os.environ["JISHI_HOME"])
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "jishi"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "jishi"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "jishi"


def installed_path(name: str, prefix: str | os.PathLike | None = None) -> Path | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = data_dir(prefix) / "models" / name
    return path if path.is_dir() else None
