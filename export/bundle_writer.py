"""Write a bundle directory: staged beside the target, then swapped in whole.

A build that fails or is interrupted leaves the previous bundle (if any) as
it was and no half-written one under the target name.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from pathlib import Path

from jishi.errors import JishiError
from jishi.runtime.bundle import sha256_of
from jishi.runtime.manifest import FORMAT, MANIFEST, SIGNATURE, FileEntry, Manifest
from jishi.runtime.store import swap_in


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
    check_target(target)
    swap_in(staging, target)
