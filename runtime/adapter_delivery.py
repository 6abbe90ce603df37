"""Adapters delivered on their own, and the adapters they add to an installed model.

An adapter-only ``.jishi`` archive (``jishi pack BUNDLE --adapter NAME``) is a tar of
three plain files:

    adapter.json          format ``jishi-adapter``; the installed model it is for (the
                          bundle's name) and what identifies its base; the adapter's entry
                          as a bundle manifest holds it; its file's size and sha256
    adapter.sig           optional: Ed25519 signature of adapter.json's exact bytes
    NAME.onnx_adapter     the LoRA weights (onnxruntime's adapter format)

Installed, these three files become ``added/NAME/`` of a new version of the model, beside
the bundle's own ``manifest.json`` and ``manifest.sig``, which stay byte for byte as they
were signed. So signatures compose instead of breaking: the bundle's signature still
covers every file its manifest lists, and each added adapter is covered by its own.
Opening the bundle checks both, and the runtime sees the bundle's manifest with the added
adapters' entries merged in (an added adapter replaces a bundle adapter of the same name;
the bundle's own file stays, still covered by its signature, but is no longer used).

"The same base": the bundle names must agree, and then the base model's sha256 (manifest
provenance ``base_sha256``) where both sides record one, else the graph's sha256 (an
adapter made from one build fits exactly that build). A LoRA adapter is float weights on
the base's projections, so with a recorded base hash it fits every build of that base
that has merge points (int4 or fp32 alike); layers, targets and shapes are checked again
against the model it goes into.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from jishi.errors import AdapterError, BundleError
from jishi.runtime.manifest import FileEntry, Manifest

FORMAT = "jishi-adapter"
FORMAT_VERSION = 1
ADAPTER_MANIFEST = "adapter.json"
ADAPTER_SIGNATURE = "adapter.sig"
ADDED = "added"  # the folder of an installed model that holds its delivered adapters
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHAPE = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class AdapterManifest:
    bundle: str  # the name of the model (bundle) it is for
    base: dict  # base_identity() of the bundle it was packed from
    adapter: dict  # name, file, rank, alpha, targets, base_sha256, source (file relative to adapter.json)
    files: dict[str, FileEntry]
    packed_from: dict = field(default_factory=dict)  # informative: the build it was packed from
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        return self.adapter["name"]

    def to_json(self) -> bytes:
        body = asdict(self)
        body = {"format": body.pop("format"), "format_version": body.pop("format_version"), **body}
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = ADAPTER_MANIFEST) -> "AdapterManifest":
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{where} is not valid JSON ({e}); the adapter is damaged: copy it again") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise BundleError(f"{where} is not a jishi adapter manifest (format {FORMAT!r} expected)")
        if body.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"adapter format version {body.get('format_version')!r} is not supported by this jishi "
                              f"(it reads version {FORMAT_VERSION}); upgrade jishi or pack the adapter with this version")
        try:
            files = {k: FileEntry(**v) for k, v in body["files"].items()}
            m = cls(bundle=body["bundle"], base=dict(body["base"]), adapter=dict(body["adapter"]), files=files,
                    packed_from=dict(body.get("packed_from") or {}))
            name, file = m.adapter["name"], m.adapter["file"]
            missing = [k for k in ("rank", "targets") if k not in m.adapter]
            if missing:
                raise KeyError(missing[0])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{where} is malformed ({e!r} missing or of the wrong type)") from None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BundleError(f"{where} names the adapter {name!r}: letters, digits, '-', '_' or '.' expected")
        if not isinstance(file, str) or "/" in file or "\\" in file or file != f"{name}.onnx_adapter" or set(files) != {file}:
            raise BundleError(f"{where} must list exactly one file, {name}.onnx_adapter, beside it; it lists "
                              f"{sorted(files)} (refusing it)")
        return m


def base_identity(m: Manifest) -> dict:
    """What an adapter records of the bundle it was made from, to find the same base again."""
    c = m.config
    return {
        "base": m.provenance.get("base"),
        "base_sha256": m.provenance.get("base_sha256"),
        "graph_sha256": m.files[m.graph.file].sha256,
        "config": {k: getattr(c, k) for k in _SHAPE},
    }


def check_same_base(am: AdapterManifest, m: Manifest) -> None:
    """Raise AdapterError unless the adapter was made for this bundle's base."""
    what = f"adapter {am.name!r}"
    todo = f"pack it again from a bundle of this model (jishi pack BUNDLE --adapter {am.name})"
    if am.bundle != m.name:
        raise AdapterError(f"{what} is for the model {am.bundle!r}, not {m.name!r}; {todo}")
    mine, theirs = base_identity(m), am.base
    if mine["config"] != theirs.get("config"):
        diff = [f"{k} {theirs.get('config', {}).get(k)} vs {v}" for k, v in mine["config"].items()
                if theirs.get("config", {}).get(k) != v]
        raise AdapterError(f"{what} was made for another base: its model shape differs ({', '.join(diff)}); {todo}")
    if mine["base_sha256"] and theirs.get("base_sha256"):
        if mine["base_sha256"] != theirs["base_sha256"]:
            raise AdapterError(f"{what} was made for another base: base sha256 {theirs['base_sha256'][:12]}…, this "
                               f"model's is {mine['base_sha256'][:12]}…; {todo}")
    elif mine["graph_sha256"] != theirs.get("graph_sha256"):
        raise AdapterError(f"{what} was made for another base: no base hash is recorded on both sides and its graph "
                           f"sha256 {str(theirs.get('graph_sha256'))[:12]}… differs from this model's "
                           f"{mine['graph_sha256'][:12]}…; {todo}")


@dataclass(frozen=True)
class Added:
    """One delivered adapter of an installed model, verified."""

    manifest: AdapterManifest
    raw: bytes  # adapter.json's bytes
    folder: str  # "added/NAME"
    signed: bool

    @property
    def paths(self) -> set[str]:
        out = {f"{self.folder}/{ADAPTER_MANIFEST}", *(f"{self.folder}/{f}" for f in self.manifest.files)}
        return out | ({f"{self.folder}/{ADAPTER_SIGNATURE}"} if self.signed else set())


def read_adapter_dir(folder: Path, key=None, verify_hashes: bool = True) -> tuple[AdapterManifest, bytes, bool]:
    """Verify an adapter directory (an unpacked archive, or ``added/NAME``): signature with ``key``
    (before the manifest is parsed), then every file's size and sha256, and nothing else in it."""
    from jishi.runtime.bundle import _os_clutter, check_files

    mpath, spath = folder / ADAPTER_MANIFEST, folder / ADAPTER_SIGNATURE
    for p in (mpath, spath):
        if p.is_symlink():
            raise BundleError(f"{p.name} of the adapter is a symbolic link; refusing it")
    if not mpath.is_file():
        raise BundleError(f"{folder} has no {ADAPTER_MANIFEST}: not a jishi adapter")
    raw = mpath.read_bytes()
    signed = spath.is_file()
    if key is not None:
        from jishi.runtime.signing import verify_signature

        verify_signature(raw, spath.read_bytes() if signed else None, key, what="the adapter",
                         file=ADAPTER_SIGNATURE, sign_hint="pack it with `jishi pack BUNDLE --adapter NAME --sign KEY`")
    am = AdapterManifest.from_json(raw)
    check_files(folder, am.files, ADAPTER_MANIFEST, verify_hashes, "copy the adapter archive again")
    allowed = set(am.files) | {ADAPTER_MANIFEST, ADAPTER_SIGNATURE}
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            raise BundleError(f"{rel} in the adapter is a symbolic link; refusing it")
        if p.is_dir() or (rel not in allowed and not _os_clutter(p.name)):
            raise BundleError(f"{rel} is in the adapter but not in its {ADAPTER_MANIFEST}; refusing it")
    return am, raw, signed


def read_added(root: Path, manifest: Manifest, key=None, verify_hashes: bool = True) -> list[Added]:
    """The delivered adapters of an installed model (``added/*``), each verified against it."""
    top = root / ADDED
    if top.is_symlink():
        raise BundleError(f"{ADDED}/ in the bundle is a symbolic link; refusing it")
    if not top.is_dir():
        return []
    out = []
    for folder in sorted(top.iterdir()):
        if folder.is_symlink() or not folder.is_dir():
            raise BundleError(f"{ADDED}/{folder.name} is not an adapter folder; refusing the bundle")
        am, raw, signed = read_adapter_dir(folder, key=key, verify_hashes=verify_hashes)
        if am.name != folder.name:
            raise BundleError(f"{ADDED}/{folder.name} holds the adapter {am.name!r}; refusing it")
        try:
            check_same_base(am, manifest)
        except AdapterError as e:
            raise BundleError(f"{ADDED}/{folder.name}: {e}") from None
        out.append(Added(am, raw, f"{ADDED}/{folder.name}", signed))
    return out


def with_added(m: Manifest, added: list[Added]) -> Manifest:
    """The bundle's manifest as the runtime sees it: delivered adapters merged in."""
    if not added:
        return m
    names = {a.manifest.name for a in added}
    entries = [a for a in m.adapters if a["name"] not in names]
    files = dict(m.files)
    for a in added:
        entries.append({**a.manifest.adapter, "file": f"{a.folder}/{a.manifest.adapter['file']}", "delivered": True})
        files.update({f"{a.folder}/{n}": e for n, e in a.manifest.files.items()})
    return replace(m, adapters=entries, files=files)


def check_fits(bundle, am: AdapterManifest, adapter_file: Path) -> None:
    """Refuse (AdapterError) an adapter that cannot go into this bundle, saying which and why."""
    from jishi.runtime.adapters import check_params, read_adapter_file

    m = bundle.manifest
    if not m.merge_points:
        raise AdapterError(f"the installed model {m.name!r} was built without merge points, so it cannot take the "
                           f"adapter {am.name!r}: install a build of it with merge points (jishi build --merge-points) "
                           "first; nothing was changed")
    check_same_base(am, m)
    try:
        check_params(am.name, read_adapter_file(adapter_file), m.config, tuple(m.merge_points["targets"]))
    except AdapterError as e:
        raise AdapterError(f"{e}; nothing was changed: pack the adapter again from a bundle of {m.name!r}") from None
