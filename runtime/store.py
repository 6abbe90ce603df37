"""Installed models: ``<data dir>/models``, installed and replaced atomically.

Layout: each installed version is an immutable directory ``<name>@<hash>``, and
``<name>.current`` names the active one. An install unpacks into a staging
directory, verifies it completely, renames it into place, then replaces the
pointer file with ``os.replace`` (atomic on every platform). Whenever it is
interrupted — power cut, full disk, Ctrl-C — the pointer still names the old,
complete version (or the new, complete one); leftovers are cleaned on the next
install.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jishi.errors import BundleError, JishiError

POINTER = ".current"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


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


def models_dir(prefix=None) -> Path:
    return data_dir(prefix) / "models"


def valid_name(name: str) -> bool:
    return bool(name) and name[0] not in ".-" and set(name.lower()) <= _NAME_OK and len(name) <= 100


def installed_path(name: str, prefix=None) -> Path | None:
    """The active version's directory of an installed model, or None."""
    if not valid_name(name):
        return None
    pointer = models_dir(prefix) / (name + POINTER)
    try:
        version = pointer.read_text().strip()
    except OSError:
        return None
    path = models_dir(prefix) / version
    if not version.startswith(name + "@") or "/" in version or "\\" in version or not path.is_dir():
        return None
    return path


@dataclass(frozen=True)
class Installed:
    name: str
    path: Path
    size: int
    quantization: str
    signed: bool


def list_installed(prefix=None) -> list[Installed]:
    from jishi.runtime.bundle import open_bundle

    out = []
    root = models_dir(prefix)
    for pointer in sorted(root.glob("*" + POINTER)) if root.is_dir() else []:
        name = pointer.name[: -len(POINTER)]
        path = installed_path(name, prefix)
        if path is None:
            continue
        try:
            b = open_bundle(path, verify_hashes=False)
        except BundleError:
            continue
        out.append(Installed(name, path, b.size, b.manifest.graph.quantization.get("name", "?"), b.signed))
    return out


def _cleanup(root: Path) -> None:
    """Remove staging and superseded directories left by interrupted installs."""
    active = set()
    for pointer in root.glob("*" + POINTER):
        try:
            active.add(pointer.read_text().strip())
        except OSError:
            pass
    for path in root.iterdir():
        if path.is_dir() and (path.name.startswith(".staging-") or ("@" in path.name and path.name not in active)):
            shutil.rmtree(path, ignore_errors=True)
    for tmp in root.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def install(source: str | Path, prefix=None, key: str | Path | None = None,
            hook: Callable[[str], None] | None = None) -> Path:
    """Verify and activate a bundle (a ``.jishi`` archive or a directory); returns the installed path.

    ``hook(step)`` is called after each step (tests interrupt installs there).
    """
    from jishi.runtime.archive import unpack
    from jishi.runtime.bundle import open_bundle

    step = hook or (lambda _: None)
    source = Path(source)
    root = models_dir(prefix)
    root.mkdir(parents=True, exist_ok=True)
    _cleanup(root)
    staging = root / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        if source.is_dir():
            for p in source.rglob("*"):
                if p.is_symlink():
                    raise BundleError(f"{p.relative_to(source)} in the bundle is a symbolic link; refusing it")
            shutil.copytree(source, staging, dirs_exist_ok=True)
        else:
            free = shutil.disk_usage(root).free
            unpack(source, staging, max_bytes=free)
        step("unpacked")
        bundle = open_bundle(staging, key=key)
        step("verified")
        name = bundle.manifest.name
        if not valid_name(name):
            raise BundleError(f"the bundle's name {name!r} is not usable as an installed name")
        digest = hashlib.sha256(bundle.manifest_bytes).hexdigest()[:12]
        version = root / f"{name}@{digest}"
        if version.exists():
            shutil.rmtree(staging)
        else:
            fsync_tree(staging)
            os.replace(staging, version)
            fsync_dir(root)
        step("placed")
        pointer = root / (name + POINTER)
        tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(version.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, pointer)
        fsync_dir(root)
        step("activated")
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise JishiError(f"installing failed ({e}); the previously installed version, if any, is unchanged") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _cleanup(root)
    return version


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def remove(name: str, prefix=None) -> Path:
    path = installed_path(name, prefix)
    if path is None:
        raise JishiError(f"no installed model named {name!r} (see `jishi list`)")
    (models_dir(prefix) / (name + POINTER)).unlink()
    shutil.rmtree(path, ignore_errors=True)
    return path
