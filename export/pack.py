"""``jishi pack``: one archive of a verified (and optionally signed) bundle, for a USB stick;
or, with ``--adapter NAME``, an archive of that adapter alone (see runtime.adapter_delivery)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from jishi.errors import AdapterError
from jishi.runtime.adapter_delivery import ADAPTER_MANIFEST, ADAPTER_SIGNATURE, AdapterManifest, base_identity
from jishi.runtime.archive import pack as write_tar
from jishi.runtime.bundle import open_bundle, sha256_of
from jishi.runtime.manifest import MANIFEST, SIGNATURE, FileEntry


def pack_bundle(bundle_dir: str | Path, out: str | Path, sign_key: str | Path | None = None) -> Path:
    bundle_dir, out = Path(bundle_dir), Path(out)
    bundle = open_bundle(bundle_dir)
    if bundle.added:
        raise AdapterError(f"{bundle_dir} is an installed model with delivered adapters "
                           f"({', '.join(a.manifest.name for a in bundle.added)}); pack the bundle it was installed from, "
                           "and each adapter with --adapter NAME")
    if sign_key is not None:
        from jishi.export.signing import sign_bundle

        sign_bundle(bundle_dir, sign_key)
        bundle = open_bundle(bundle_dir)
    names = [MANIFEST] + ([SIGNATURE] if bundle.signed else []) + sorted(bundle.manifest.files)
    _write(bundle_dir, out, names)
    return out


def pack_adapter(bundle_dir: str | Path, name: str, out: str | Path, sign_key: str | Path | None = None) -> Path:
    """An archive of one adapter of the bundle, for installing into the same model elsewhere.

    It holds the adapter's file and ``adapter.json``: the bundle's name, what identifies its base
    (base sha256, graph sha256, model shape), the adapter's manifest entry and the file's size
    and sha256; with ``sign_key``, ``adapter.sig`` signs adapter.json with the bundle scheme.
    """
    bundle_dir, out = Path(bundle_dir), Path(out)
    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    entry = next((a for a in m.adapters if a["name"] == name), None)
    if entry is None:
        raise AdapterError(f"the bundle has no adapter {name!r}; it has: {', '.join(a['name'] for a in m.adapters) or 'none'} "
                           f"(add one with `jishi adapter add {bundle_dir} NAME=DIR`)")
    file = f"{name}.onnx_adapter"
    src = bundle.path(entry["file"])
    adapter = {k: v for k, v in entry.items() if k != "delivered"} | {"file": file}
    with tempfile.TemporaryDirectory(prefix=".jishi-pack-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        tmp = Path(tmp)
        shutil.copyfile(src, tmp / file)
        am = AdapterManifest(bundle=m.name, base=base_identity(m), adapter=adapter,
                             files={file: FileEntry(size=(tmp / file).stat().st_size, sha256=sha256_of(tmp / file))},
                             packed_from={"quantization": m.graph.quantization.get("name")})
        raw = am.to_json()
        (tmp / ADAPTER_MANIFEST).write_bytes(raw)
        names = [ADAPTER_MANIFEST]
        if sign_key is not None:
            from jishi.export.signing import sign_bytes

            (tmp / ADAPTER_SIGNATURE).write_bytes(sign_bytes(raw, sign_key))
            names.append(ADAPTER_SIGNATURE)
        _write(tmp, out, names + [file])
    return out


def _write(root: Path, out: Path, names: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        write_tar(root, partial, names)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
