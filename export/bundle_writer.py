"""Write a bundle directory: staged beside the target, then swapped in whole.

A build that fails or is interrupted leaves the previous bundle (if any) as
it was and no half-written one under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from jishi.errors import JishiError
from jishi.runtime.bundle import sha256_of
from jishi.runtime.manifest import FORMAT, MANIFEST, SIGNATURE, FileEntry, Manifest
from jishi.runtime.store import fsync_dir, fsync_tree


def staging_dir(target: Path) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def file_entries(root: Path, names: list[str]) -> dict[str, FileEntry]:
    return {n: FileEntry(size=(root / n).stat().st_size, sha256=sha256_of(root / n)) for n in sorted(names)}


def write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_bytes(manifest.to_json())
    os.replace(tmp, root / MANIFEST)


def with_files(manifest: Manifest, root: Path) -> Manifest:
    """The manifest with every file of the bundle directory (but itself and a signature) listed."""
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    names = [n for n in names if n not in (MANIFEST, MANIFEST + ".tmp", SIGNATURE)]
    return replace(manifest, files=file_entries(root, names))


def check_target(target: Path) -> None:
    """Only an absent path or an existing jishi bundle may be written over."""
    target = Path(target)
    if not target.exists():
        return
    manifest = target / MANIFEST
    if target.is_dir() and manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("format") == FORMAT:
                return
        except (ValueError, OSError):
            pass
    raise JishiError(f"{target} exists and is not a jishi bundle; choose another output path (nothing was changed)")


def publish(staging: Path, target: Path) -> None:
    """Swap the staged bundle in under ``target``; an older bundle there is removed only after."""
    target = Path(target)
    check_target(target)
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
