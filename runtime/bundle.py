"""Open and verify a bundle directory before anything in it is parsed.

Order of checks: the manifest is read (never through a link), every file it
lists is checked for a safe path, its size and its sha256; files present but
not listed are refused; then the ONNX graph's external-data locations are
checked to stay inside the bundle. Only then may onnxruntime open the graph.
onnx and onnxruntime have had path-traversal and symlink bugs around external
data (CVE-2022-25882, CVE-2024-27318, CVE-2025-51480, CVE-2026-27489), so the
locations are read here with a small protobuf reader, not left to them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from jishi.errors import BundleError
from jishi.runtime.manifest import MANIFEST, SIGNATURE, Manifest


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest  # as the runtime sees it: delivered adapters (added/*) merged in
    manifest_bytes: bytes  # manifest.json exactly as built and signed
    added: tuple = ()  # the delivered adapters (runtime.adapter_delivery.Added), each verified

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def signed(self) -> bool:
        """The bundle and every delivered adapter carry a signature."""
        return (self.root / SIGNATURE).is_file() and all(a.signed for a in self.added)

    @property
    def version_bytes(self) -> bytes:
        """What tells one installed version from another: the manifest and every delivered adapter's."""
        return self.manifest_bytes + b"".join(b"\0" + a.raw for a in self.added)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.manifest.files.values())


def check_relative(name: str) -> PurePosixPath:
    """A manifest path must be relative, use '/', and stay inside the bundle."""
    p = PurePosixPath(name)
    if (not name or "\\" in name or p.is_absolute() or ".." in p.parts or name.startswith("~")
            or any(":" in part or part.endswith((".", " ")) and part != "." for part in p.parts)):
        raise BundleError(f"the manifest names the file {name!r}, a path that leaves the bundle; refusing it")
    return p


def _no_links(root: Path, rel: PurePosixPath) -> Path:
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{rel} in the bundle is (or passes through) a symbolic link; refusing it")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_files(root: Path, files: dict, listed_in: str, verify_hashes: bool, missing_hint: str) -> None:
    """Every file of ``files`` (name → FileEntry) is in ``root``, no link, of its size and (if asked) sha256."""
    for name, entry in files.items():
        path = _no_links(root, check_relative(name))
        if not path.is_file():
            raise BundleError(f"{name} is listed in {listed_in} but missing; {missing_hint}")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"{name} is {size} bytes, {listed_in} says {entry.size}: the file is damaged or truncated")
        if verify_hashes and sha256_of(path) != entry.sha256:
            raise BundleError(f"{name} does not match its sha256 in {listed_in}: the file is damaged or was changed")


def open_bundle(root: str | Path, verify_hashes: bool = True, key: str | Path | None = None) -> Bundle:
    """Verify and open a bundle directory.

    With ``key`` (a public key file) the bundle must carry a valid signature by it;
    the signature is checked on the manifest's bytes before they are parsed. Delivered
    adapters (``added/NAME/``, see runtime.adapter_delivery) are verified the same way, each
    against its own signature, and must be for this bundle's base.
    """
    root = Path(root)
    if not root.exists():
        raise BundleError(f"no bundle at {root}: the path does not exist")
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: not a jishi bundle (build one with `jishi build`)")
    raw = mpath.read_bytes()
    if key is not None:
        from jishi.runtime.signing import verify_signature

        spath = root / SIGNATURE
        if spath.is_symlink():
            raise BundleError(f"{SIGNATURE} in the bundle is a symbolic link; refusing it")
        verify_signature(raw, spath.read_bytes() if spath.is_file() else None, key)
    manifest = Manifest.from_json(raw)
    check_files(root, manifest.files, "the manifest", verify_hashes, "copy the bundle again")
    from jishi.runtime.adapter_delivery import read_added, with_added

    added = read_added(root, manifest, key=key, verify_hashes=verify_hashes)
    listed = set(manifest.files) | {MANIFEST, SIGNATURE}
    for a in added:
        listed |= a.paths
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise BundleError(f"{rel} in the bundle is a symbolic link; refusing it")
        if path.is_file() and rel not in listed and not _os_clutter(path.name):
            raise BundleError(f"{rel} is in the bundle but not in its manifest; remove it or rebuild the bundle")
    for name in (manifest.graph.file, manifest.graph.data_file, manifest.tokenizer.file):
        if name is not None and name not in manifest.files:
            raise BundleError(f"the manifest refers to {name!r} but does not list it among its files")
    graphs = [manifest.graph.file] + ([manifest.merge_points["graph"]] if (manifest.merge_points or {}).get("graph") else [])
    for name in graphs:
        if name not in manifest.files:
            raise BundleError(f"the manifest refers to {name!r} but does not list it among its files")
        check_external_data(root / name, root, set(manifest.files))
    from jishi.runtime.graph_shapes import check_config_against_graph

    check_config_against_graph(manifest.config, root / manifest.graph.file)
    return Bundle(root=root, manifest=with_added(manifest, added), manifest_bytes=raw, added=tuple(added))


def _os_clutter(name: str) -> bool:
    """Files that file managers and FAT/exFAT USB sticks add; never read by jishi."""
    return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith("._")


# --- ONNX external data, read straight from the protobuf wire format -------------------

# Field numbers from onnx.proto.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_NODE_ATTR = 5
_FUNC_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message; length-delimited values as memoryviews."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > n:
                raise ValueError("truncated field")
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > n:
            raise ValueError("truncated message")
        yield num, wire, value


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _sub(buf, *wanted):
    for num, wire, value in _fields(buf):
        if wire == 2 and num in wanted:
            yield num, value


def _tensor_locations(tensor):
    for _, entry in _sub(tensor, _TENSOR_EXTERNAL):
        kv = {num: bytes(v) for num, v in _sub(entry, _ENTRY_KEY, _ENTRY_VALUE)}
        if kv.get(_ENTRY_KEY) == b"location":
            yield kv.get(_ENTRY_VALUE, b"").decode("utf-8", "replace")


def _graph_locations(graph, depth=0):
    if depth > 32:
        raise ValueError("graphs nested too deeply")
    for num, value in _sub(graph, _GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT):
        if num == _GRAPH_INIT:
            yield from _tensor_locations(value)
        elif num == _GRAPH_SPARSE_INIT:
            for _, t in _sub(value, _SPARSE_VALUES, _SPARSE_INDICES):
                yield from _tensor_locations(t)
        else:
            yield from _node_locations(value, depth)


def _node_locations(node, depth):
    for _, attr in _sub(node, _NODE_ATTR):
        for num, value in _sub(attr, _ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES):
            if num in (_ATTR_T, _ATTR_TENSORS):
                yield from _tensor_locations(value)
            elif num in (_ATTR_G, _ATTR_GRAPHS):
                yield from _graph_locations(value, depth + 1)
            else:
                for _, t in _sub(value, _SPARSE_VALUES, _SPARSE_INDICES):
                    yield from _tensor_locations(t)


def external_data_locations(model_bytes: bytes) -> set[str]:
    """Every external-data location named anywhere in an ONNX model."""
    buf = memoryview(model_bytes)
    out: set[str] = set()
    for num, value in _sub(buf, _MODEL_GRAPH, _MODEL_FUNCTIONS):
        if num == _MODEL_GRAPH:
            out.update(_graph_locations(value))
        else:
            for _, node in _sub(value, _FUNC_NODE):
                out.update(_node_locations(node, 0))
    return out


def check_external_data(model_path: Path, root: Path, allowed: set[str]) -> None:
    try:
        locations = external_data_locations(model_path.read_bytes())
    except ValueError as e:
        raise BundleError(f"{model_path.name} is not a readable ONNX model ({e}); the bundle is damaged") from None
    base = PurePosixPath(model_path.relative_to(root).as_posix()).parent  # onnxruntime resolves beside the graph
    for loc in locations:
        rel = base / check_relative(loc)
        if ".." in rel.parts or rel.as_posix() not in allowed:
            raise BundleError(
                f"{model_path.name} reads weights from {loc!r}, which is not a file of the bundle; refusing it"
            )
        _no_links(root, rel)


def _tensor_header(tensor) -> tuple[str, list[int], int, bytes | None, dict[str, str]]:
    name, dims, dtype, raw, ext = "", [], 0, None, {}
    for num, wire, value in _fields(tensor):
        if num == 1:  # dims: packed or one varint per field
            if wire == 0:
                dims.append(value)
            else:
                i = 0
                while i < len(value):
                    d, i = _varint(value, i)
                    dims.append(d)
        elif num == 2:
            dtype = value
        elif num == 8:
            name = bytes(value).decode()
        elif num == 9:
            raw = bytes(value)
        elif num == _TENSOR_EXTERNAL:
            kv = {n: bytes(v).decode() for n, v in _sub(value, _ENTRY_KEY, _ENTRY_VALUE)}
            ext[kv.get(_ENTRY_KEY, "")] = kv.get(_ENTRY_VALUE, "")
    return name, dims, dtype, raw, ext


def float_initializers(bundle: Bundle, prefix: str, graph_file: str | None = None) -> dict:
    """The float32 initializers of a graph of the bundle (its main one by default) whose names start with ``prefix``.

    Read straight from the graph and its (already verified) external-data file, for the
    runtime to combine the merge points' defaults with an adapter.
    """
    import numpy as np

    graph_file = graph_file or bundle.manifest.graph.file
    model = memoryview(bundle.path(graph_file).read_bytes())
    out = {}
    for num, graph in _sub(model, _MODEL_GRAPH):
        for _, tensor in _sub(graph, _GRAPH_INIT):
            name, dims, dtype, raw, ext = _tensor_header(tensor)
            if not name.startswith(prefix):
                continue
            if dtype != 1:
                raise BundleError(f"initializer {name} is not float32")
            count = int(np.prod(dims)) if dims else 1
            if raw is not None:
                data = np.frombuffer(raw, dtype="<f4", count=count)
            else:
                loc = PurePosixPath(graph_file).parent / check_relative(ext["location"])
                if loc.as_posix() not in bundle.manifest.files:
                    raise BundleError(f"initializer {name} reads from {loc}, not a file of the bundle")
                data = np.fromfile(bundle.path(loc.as_posix()), dtype="<f4", count=count, offset=int(ext.get("offset", 0)))
            if data.size != count:
                raise BundleError(f"initializer {name} is truncated in the bundle")
            out[name] = data.reshape(dims).astype(np.float32, copy=False)
    return out
