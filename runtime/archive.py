"""Unpacking a ``.jishi`` archive (a tar of a bundle) without trusting it.

Only plain files and directories are accepted, each under a relative path that
stays inside the target; links, devices, FIFOs, absolute paths, ``..`` and
duplicate names are refused before anything is written. The caller unpacks into
an empty staging directory and verifies the result as a bundle before using it.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath

from jishi.errors import BundleError

MAX_MEMBERS = 10_000


def _check_member(m: tarfile.TarInfo, seen: set[str]) -> PurePosixPath | None:
    name = m.name
    p = PurePosixPath(name)
    if not name or name.startswith("/") or "\\" in name or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise BundleError(f"the archive holds {name!r}, a path that leaves the bundle; refusing it")
    if m.issym() or m.islnk():
        raise BundleError(f"the archive holds a link {name!r} -> {m.linkname!r}; refusing it")
    if not (m.isfile() or m.isdir()):
        raise BundleError(f"the archive holds {name!r}, which is not a plain file (a device or FIFO); refusing it")
    norm = "/".join(part for part in p.parts if part != ".")
    if m.isdir():
        return None
    if norm in seen:
        raise BundleError(f"the archive holds {name!r} twice; refusing it")
    seen.add(norm)
    return PurePosixPath(norm)


def unpack(archive: str | Path, target: Path, max_bytes: int | None = None) -> None:
    """Unpack ``archive`` into the empty directory ``target``; refuse anything unsafe first."""
    archive = Path(archive)
    if not archive.is_file():
        raise BundleError(f"no archive at {archive}")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{archive.name} is not a readable .jishi archive ({e}); copy it again") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise BundleError(f"{archive.name} is damaged or truncated ({e}); copy it again") from None
        if len(members) > MAX_MEMBERS:
            raise BundleError(f"{archive.name} holds {len(members)} entries: not a bundle")
        seen: set[str] = set()
        files = [(m, rel) for m in members if (rel := _check_member(m, seen)) is not None]
        total = sum(m.size for m, _ in files)
        if max_bytes is not None and total > max_bytes:
            raise BundleError(f"{archive.name} would unpack to {total / 1e6:.0f} MB, more than the {max_bytes / 1e6:.0f} MB free")
        for m, rel in files:
            dest = target.joinpath(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:
                raise BundleError(f"cannot read {m.name} from {archive.name}")
            try:
                with src, open(dest, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (tarfile.TarError, EOFError) as e:
                raise BundleError(f"{archive.name} is damaged or truncated at {m.name} ({e}); copy it again") from None


def pack(bundle_dir: Path, out: Path, names: list[str]) -> None:
    """Write ``names`` (relative to ``bundle_dir``) into a tar at ``out`` with plain, ownerless entries."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tar.gettarinfo(str(bundle_dir / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(bundle_dir / name, "rb") as f:
                tar.addfile(info, f)
