"""Installed models: ``<data dir>/models``, installed and replaced atomically.

Layout: each installed version is an immutable directory ``<name>@<hash>``, and
``<name>.current`` names the active one. An install unpacks into a staging
directory, verifies it completely, renames it into place, then replaces the
pointer file with ``os.replace`` (atomic on every platform). Whenever it is
interrupted — power cut, full disk, Ctrl-C — the pointer still names the old,
complete version (or the new, complete one); leftovers are cleaned on the next
install.

An adapter-only archive (see runtime.adapter_delivery) is installed the same way:
it is verified in a staging directory, checked against the active version of the
model it is for, and a new version is assembled beside it — the active version's
files hard-linked (copied where the filesystem cannot link), the adapter under
``added/NAME/`` — then the pointer is switched. The active version is never
written to.
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

from jishi.errors import AdapterError, BundleError, JishiError

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
    adapters: tuple[str, ...] = ()


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
        out.append(Installed(name, path, b.size, b.manifest.graph.quantization.get("name", "?"), b.signed,
                             tuple(a["name"] for a in b.manifest.adapters)))
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
    """Verify and activate a bundle, or an adapter for an installed model (a ``.jishi``
    archive or a directory); returns the installed version's path.

    ``hook(step)`` is called after each step (tests interrupt installs there).
    """
    from jishi.runtime.adapter_delivery import ADAPTER_MANIFEST
    from jishi.runtime.archive import unpack
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.manifest import MANIFEST

    step = hook or (lambda _: None)
    source = Path(source)
    root = models_dir(prefix)
    root.mkdir(parents=True, exist_ok=True)
    _cleanup(root)
    staging = root / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    assembled = None
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
        if (staging / ADAPTER_MANIFEST).exists() and not (staging / MANIFEST).exists():
            assembled = root / f".staging-{uuid.uuid4().hex[:12]}"
            name, digest = _assemble_with_adapter(staging, assembled, root, prefix, key, step)
            shutil.rmtree(staging)
            staging = assembled
        else:
            bundle = open_bundle(staging, key=key)
            step("verified")
            name = bundle.manifest.name
            if not valid_name(name):
                raise BundleError(f"the bundle's name {name!r} is not usable as an installed name")
            digest = hashlib.sha256(bundle.version_bytes).hexdigest()[:12]
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
        _discard(staging, assembled)
        raise JishiError(f"installing failed ({e}); the previously installed version, if any, is unchanged") from None
    except BaseException:
        _discard(staging, assembled)
        raise
    _cleanup(root)
    return version


def _discard(*paths: Path | None) -> None:
    for p in paths:
        if p is not None:
            shutil.rmtree(p, ignore_errors=True)


def _assemble_with_adapter(incoming: Path, target: Path, root: Path, prefix, key, step) -> tuple[str, str]:
    """Build in ``target`` the next version of the model that the adapter in ``incoming`` is for:
    the active version's files plus ``added/NAME/``. Returns the model's name and the version's digest."""
    from jishi.runtime.adapter_delivery import ADDED, check_fits, read_adapter_dir
    from jishi.runtime.bundle import open_bundle

    am, _, _ = read_adapter_dir(incoming, key=key)
    step("verified")
    current = installed_path(am.bundle, prefix) if valid_name(am.bundle) else None
    if current is None:
        raise AdapterError(f"the adapter {am.name!r} is for the model {am.bundle!r}, which is not installed in {root}: "
                           f"install its bundle first (jishi install {am.bundle}.jishi), then this adapter; nothing was changed")
    base = open_bundle(current)  # what the new version is built from, verified again
    check_fits(base, am, incoming / am.adapter["file"])
    replaced = Path(ADDED, am.name)
    target.mkdir()
    for src in sorted(current.rglob("*")):
        rel = src.relative_to(current)
        if rel == replaced or replaced in rel.parents:
            continue  # an earlier delivery of this adapter: replaced by the new one
        dst = target / rel
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, dst)
    (target / replaced).parent.mkdir(parents=True, exist_ok=True)
    os.replace(incoming, target / replaced)
    incoming.mkdir()  # the caller removes it
    step("linked")
    bundle = open_bundle(target, verify_hashes=False)  # base files are the verified ones, linked; the adapter checked above
    if am.name not in {a["name"] for a in bundle.manifest.adapters}:
        raise BundleError(f"the adapter {am.name!r} did not assemble into {am.bundle!r}; nothing was changed")
    return am.bundle, hashlib.sha256(bundle.version_bytes).hexdigest()[:12]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Share the file of an immutable version (a hard link); copy where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def swap_in(staging: Path, target: Path) -> None:
    """Put the staged directory ``staging`` under ``target`` durably; a directory already there is
    removed only once the new one is in place, so an interruption leaves one or the other whole."""
    target = Path(target)
    fsync_tree(staging)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)  # the rename survives a power cut
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove(name: str, prefix=None) -> Path:
    path = installed_path(name, prefix)
    if path is None:
        raise JishiError(f"no installed model named {name!r} (see `jishi list`)")
    (models_dir(prefix) / (name + POINTER)).unlink()
    shutil.rmtree(path, ignore_errors=True)
    return path
