"""Signed archives, verification and atomic installs: bad input refused, nothing lost."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import jishi
from jishi.errors import AdapterError, BundleError, JishiError, SignatureError
from jishi.export.pack import pack_bundle
from jishi.export.signing import keygen, sign_bundle
from jishi.runtime.bundle import open_bundle
from jishi.runtime.store import install, installed_path, list_installed, remove


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_dirs):
    """Two different bundles of one name: the installed version and its update."""
    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("versions")
    v1 = build(str(tiny_dirs["llama"]), "fp32", root / "v1", name="tiny", context=128, evaluate=False, quiet=True,
               merge_points=False)
    v2 = build(str(tiny_dirs["llama"]), "int4", root / "v2", name="tiny", context=128, evaluate=False, quiet=True)
    return v1, v2


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return keygen(root / "school"), keygen(root / "other")


@pytest.fixture
def prefix(tmp_path, versions):
    """A store with v1 installed."""
    p = tmp_path / "store"
    install(versions[0], prefix=p)
    return p


def assert_v1_intact(prefix, versions):
    path = installed_path("tiny", prefix)
    assert path is not None
    bundle = open_bundle(path)
    assert bundle.manifest_bytes == (versions[0] / "manifest.json").read_bytes()
    m = jishi.load(path)
    assert m.generate("Hello", max_new_tokens=3, temperature=0).completion_tokens == 3


def test_pack_install_list_load_remove(tmp_path, versions, keys, prefix):
    (private, public), _ = keys
    work = tmp_path / "v2"
    shutil.copytree(versions[1], work)
    archive = pack_bundle(work, tmp_path / "tiny.jishi", sign_key=private)
    installed = install(archive, prefix=prefix, key=public)
    assert installed_path("tiny", prefix) == installed
    assert open_bundle(installed, key=public).manifest.graph.quantization["name"] == "int4"
    [row] = list_installed(prefix)
    assert row.name == "tiny" and row.signed and row.quantization == "int4"
    # loading by name: the store is the user's data directory here
    os.environ["JISHI_HOME"] = str(prefix)
    try:
        assert jishi.load("tiny").manifest.graph.quantization["name"] == "int4"
    finally:
        del os.environ["JISHI_HOME"]
    # the superseded version is gone, only the active one is kept
    assert [p.name for p in (prefix / "models").iterdir() if p.is_dir()] == [installed.name]
    remove("tiny", prefix)
    assert installed_path("tiny", prefix) is None and not installed.exists()
    with pytest.raises(JishiError, match="no installed model named 'tiny'"):
        remove("tiny", prefix)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _entries(bundle: Path, change=None) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The bundle's files as tar entries; ``change(name, data)`` may alter one."""
    out = []
    for p in sorted(bundle.iterdir()):
        data = p.read_bytes()
        if change:
            data = change(p.name, data)
        if data is None:
            continue
        info = tarfile.TarInfo(p.name)
        info.size = len(data)
        out.append((info, data))
    return out


def _special(name, kind, link="") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


def _extra(name, data=b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _flip(target):
    def change(name, data):
        if name != target:
            return data
        b = bytearray(data)
        b[len(b) // 2] ^= 1
        return bytes(b)
    return change


def _manifest_edit(edit):
    def change(name, data):
        if name != "manifest.json":
            return data
        body = json.loads(data)
        edit(body)
        return json.dumps(body).encode()
    return change


def _drop(target):
    return lambda name, data: None if name == target else data


def _outside_location(body):
    body["files"]["../outside.data"] = body["files"].pop("model.onnx.data")


CASES = {
    "flipped byte in the weights": (lambda b: _entries(b, _flip("model.onnx.data")), BundleError, "does not match its sha256"),
    "flipped byte in the graph": (lambda b: _entries(b, _flip("model.onnx")), BundleError, "(does not match its sha256|not a readable ONNX)"),
    "flipped byte in the tokenizer": (lambda b: _entries(b, _flip("tokenizer.json")), BundleError, "does not match its sha256"),
    "absolute path": (lambda b: _entries(b) + [_extra("/tmp/jishi-escape")], BundleError, "leaves the bundle"),
    "parent traversal": (lambda b: _entries(b) + [_extra("../jishi-escape")], BundleError, "leaves the bundle"),
    "nested traversal": (lambda b: _entries(b) + [_extra("a/../../jishi-escape")], BundleError, "leaves the bundle"),
    "backslash traversal": (lambda b: _entries(b) + [_extra("..\\jishi-escape")], BundleError, "leaves the bundle"),
    "symlink": (lambda b: _entries(b) + [_special("link", tarfile.SYMTYPE, "/etc/passwd")], BundleError, "a link"),
    "hard link": (lambda b: _entries(b) + [_special("hard", tarfile.LNKTYPE, "manifest.json")], BundleError, "a link"),
    "character device": (lambda b: _entries(b) + [_special("dev", tarfile.CHRTYPE)], BundleError, "not a plain file"),
    "fifo": (lambda b: _entries(b) + [_special("fifo", tarfile.FIFOTYPE)], BundleError, "not a plain file"),
    "duplicate member": (lambda b: _entries(b) + [_extra("tokenizer.json", b"{}")], BundleError, "twice"),
    "missing file": (lambda b: _entries(b, _drop("tokenizer.json")), BundleError, "listed in the manifest but missing"),
    "no manifest": (lambda b: _entries(b, _drop("manifest.json")), BundleError, "has no manifest.json"),
    "extra file": (lambda b: _entries(b) + [_extra("run_me.py", b"import os")], BundleError, "not in its manifest"),
    "manifest lies about a size": (lambda b: _entries(b, _manifest_edit(lambda m: m["files"]["tokenizer.json"].update(size=5))),
                                   BundleError, "the manifest says 5"),
    "manifest names a file outside": (lambda b: _entries(b, _manifest_edit(_outside_location)), BundleError, "leaves the bundle"),
    "unknown format version": (lambda b: _entries(b, _manifest_edit(lambda m: m.update(format_version=7))),
                               BundleError, "format version 7 is not supported"),
    "unusable name": (lambda b: _entries(b, _manifest_edit(lambda m: m.update(name="../evil"))), BundleError, "not usable"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_archive_is_refused_and_the_previous_install_stays(case, tmp_path, versions, prefix):
    make, error, message = CASES[case]
    archive = _tar(tmp_path / "bad.jishi", make(versions[1]))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=message):
        install(archive, prefix=prefix)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, staging removed
    assert not Path("/tmp/jishi-escape").exists()
    assert_v1_intact(prefix, versions)


@pytest.mark.parametrize("damage", ["truncated", "not a tar", "empty"])
def test_damaged_archive_file(damage, tmp_path, versions, prefix):
    good = pack_bundle(versions[1], tmp_path / "good.jishi")
    raw = good.read_bytes()
    data = {"truncated": raw[: len(raw) // 2], "not a tar": os.urandom(4096), "empty": b""}[damage]
    bad = tmp_path / "bad.jishi"
    bad.write_bytes(data)
    with pytest.raises(BundleError, match="(damaged or truncated|not a readable .jishi archive|listed in the manifest but missing|has no manifest)"):
        install(bad, prefix=prefix)
    assert_v1_intact(prefix, versions)


def test_signatures(tmp_path, versions, keys, prefix):
    (private, public), (other_private, other_public) = keys
    work = tmp_path / "v2"
    shutil.copytree(versions[1], work)
    unsigned = pack_bundle(work, tmp_path / "unsigned.jishi")
    with pytest.raises(SignatureError, match="not signed, but a key was given"):
        install(unsigned, prefix=prefix, key=public)
    signed = pack_bundle(work, tmp_path / "signed.jishi", sign_key=other_private)
    with pytest.raises(SignatureError, match="does not match the key school.pub"):
        install(signed, prefix=prefix, key=public)
    # changed after signing: the manifest no longer matches its signature
    sign_bundle(work, private)
    body = json.loads((work / "manifest.json").read_text())
    body["name"] = "tiny"
    body["provenance"]["note"] = "changed after signing"
    (work / "manifest.json").write_text(json.dumps(body))
    tampered = _tar(tmp_path / "tampered.jishi", _entries(work))
    with pytest.raises(SignatureError, match="changed after signing, or signed with another key"):
        install(tampered, prefix=prefix, key=public)
    sig = work / "manifest.sig"
    sig.write_bytes(b"short")
    with pytest.raises(SignatureError, match="not an Ed25519 signature"):
        open_bundle(work, key=public)
    with pytest.raises(SignatureError, match="cannot read the public key .*school"):
        open_bundle(work, key=private)
    assert_v1_intact(prefix, versions)


@pytest.mark.parametrize("step", ["unpacked", "verified", "placed"])
def test_install_interrupted_after_each_step_keeps_the_old_version(step, tmp_path, versions, prefix):
    archive = pack_bundle(versions[1], tmp_path / "v2.jishi")

    def interrupt(at):
        if at == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        install(archive, prefix=prefix, hook=interrupt)
    assert_v1_intact(prefix, versions)
    # the next install cleans up and succeeds
    install(archive, prefix=prefix)
    assert open_bundle(installed_path("tiny", prefix)).manifest.graph.quantization["name"] == "int4"
    assert len([p for p in (prefix / "models").iterdir() if p.is_dir()]) == 1


def test_install_killed_at_random_moments_never_breaks_the_store(tmp_path, versions, prefix):
    archive = pack_bundle(versions[1], tmp_path / "v2.jishi")
    script = (f"import sys; sys.argv = ['jishi', 'install', {str(archive)!r}, '--prefix', {str(prefix)!r}]; "
              "from jishi.cli import main; main()")
    rng = random.Random(0)
    outcomes = set()
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.8))  # the install itself takes about half a second
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = installed_path("tiny", prefix)
        assert path is not None, "no version active after a kill"
        quant = open_bundle(path).manifest.graph.quantization["name"]
        outcomes.add(quant)
        if quant == "int4":  # the update completed: go back to v1 to try again
            install(versions[0], prefix=prefix)
    assert outcomes <= {"fp32", "int4"}
    assert jishi.load(installed_path("tiny", prefix)).generate("Hi", max_new_tokens=2, temperature=0).completion_tokens == 2


def test_cli_keygen_pack_verify_install(tmp_path, versions):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jishi.cli", *args], capture_output=True, text=True, timeout=300)

    key = tmp_path / "k"
    assert cli("keygen", "-o", str(key)).returncode == 0
    assert (key.stat().st_mode & 0o777) == 0o600
    again = cli("keygen", "-o", str(key))
    assert again.returncode == 1 and "refusing to overwrite a key" in again.stderr
    work = tmp_path / "b"
    shutil.copytree(versions[1], work)
    done = cli("pack", str(work), "-o", str(tmp_path / "t.jishi"), "--sign", str(key))
    assert done.returncode == 0, done.stderr
    done = cli("verify", str(tmp_path / "t.jishi"), "--key", f"{key}.pub")
    assert done.returncode == 0 and "every sha256 matches; signature valid (k.pub)" in done.stdout
    done = cli("install", str(tmp_path / "t.jishi"), "--prefix", str(tmp_path / "store"), "--key", f"{key}.pub")
    assert done.returncode == 0, done.stderr
    listed = cli("list", "--prefix", str(tmp_path / "store"))
    assert listed.returncode == 0 and "tiny" in listed.stdout and "yes" in listed.stdout


# --- adapter-only archives ------------------------------------------------------------------

ADAPTER_IDS = list(range(5, 45))


@pytest.fixture(scope="module")
def adapter_kit(tmp_path_factory, tiny_dirs, tiny_tokenizer, versions, keys):
    """A signed copy of v2 (int4, merge points), the same with adapters added directly (the
    references), and adapter archives: signed, unsigned, for another base, with wrong shapes."""
    from conftest import make_tiny
    from test_adapters import make_peft

    from jishi.export.adapters import add_adapter
    from jishi.export.pack import pack_adapter
    from jishi.pipeline import build

    (private, _), (other_private, _) = keys
    root = tmp_path_factory.mktemp("adapter-kit")
    base = root / "base"
    shutil.copytree(versions[1], base)
    base_archive = pack_bundle(base, root / "base.jishi", sign_key=private)
    refs, archives = {}, {}
    for label, seed in (("first", 1), ("second", 2)):
        make_peft(tiny_dirs["llama"], root / f"peft-{label}", seed)
        ref = root / f"ref-{label}"
        shutil.copytree(versions[1], ref)
        add_adapter(ref, "helpdesk", root / f"peft-{label}")
        refs[label] = ref
        archives[label] = pack_adapter(ref, "helpdesk", root / f"helpdesk-{label}.jishi", sign_key=private)
    archives["unsigned"] = pack_adapter(refs["first"], "helpdesk", root / "unsigned.jishi")
    archives["other key"] = pack_adapter(refs["first"], "helpdesk", root / "other-key.jishi", sign_key=other_private)
    # the same name and shapes, another base (other random weights)
    other_dir = make_tiny("llama", root / "other-base", tiny_tokenizer, seed=5)
    other = build(str(other_dir), "int4", root / "other-bundle", name="tiny", context=128, evaluate=False, quiet=True)
    add_adapter(other, "helpdesk", root / "peft-first")
    archives["other base"] = pack_adapter(other, "helpdesk", root / "other-base.jishi")
    # an adapter file of a wider model, for an archive that claims to be for this base
    wide_dir = make_tiny("llama", root / "wide", tiny_tokenizer, hidden_size=96, intermediate_size=128)
    make_peft(wide_dir, root / "peft-wide", 3)
    wide = build(str(wide_dir), "int4", root / "wide-bundle", name="tiny", context=128, evaluate=False, quiet=True)
    add_adapter(wide, "helpdesk", root / "peft-wide")
    return {"base": base, "base_archive": base_archive, "refs": refs, "archives": archives,
            "wide_file": wide / "adapters" / "helpdesk.onnx_adapter"}


@pytest.fixture
def store(tmp_path, adapter_kit, keys):
    """A store with the signed v2 installed (with its key)."""
    p = tmp_path / "store"
    install(adapter_kit["base_archive"], prefix=p, key=keys[0][1])
    return p


def _logits(path, adapter):
    m = jishi.load(path)
    m.use_adapter(adapter)
    return m.engine.feed(ADAPTER_IDS, all_logits=True)


def assert_store_unchanged(store, before: Path):
    """The active version is the one before, complete and loadable, and nothing half-made lies around."""
    now = installed_path("tiny", store)
    assert now == before
    bundle = open_bundle(now)
    assert [p.name for p in (store / "models").iterdir() if p.name.startswith(".staging-")] == []
    m = jishi.load(now)
    assert m.generate("Hello", max_new_tokens=3, temperature=0).completion_tokens == 3
    return bundle


def test_adapter_archive_round_trip_matches_the_adapter_added_directly(tmp_path, adapter_kit, keys, store):
    (_, public), _ = keys
    archive = adapter_kit["archives"]["first"]
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["adapter.json", "adapter.sig", "helpdesk.onnx_adapter"]
        body = json.loads(tar.extractfile("adapter.json").read())
    ref = open_bundle(adapter_kit["refs"]["first"]).manifest
    assert body["format"] == "jishi-adapter" and body["bundle"] == "tiny"
    assert body["base"]["graph_sha256"] == ref.files["model.onnx"].sha256
    [entry] = ref.adapters
    assert body["adapter"] == {**entry, "file": "helpdesk.onnx_adapter"}
    assert body["files"]["helpdesk.onnx_adapter"]["sha256"] == ref.files["adapters/helpdesk.onnx_adapter"].sha256

    before = installed_path("tiny", store)
    shared = {}

    def look(step):  # the new version reuses the active one's weights (a hard link on this filesystem)
        if step == "linked":
            [new] = [p for p in (store / "models").iterdir() if p.name.startswith(".staging-") and (p / "added").is_dir()]
            shared["same"] = os.stat(new / "model.onnx.data").st_ino == os.stat(before / "model.onnx.data").st_ino

    installed = install(archive, prefix=store, key=public, hook=look)
    assert shared["same"]
    assert installed != before and not before.exists()  # the old version was cleaned
    assert installed_path("tiny", store) == installed
    # the bundle's signed manifest is kept byte for byte; both signatures verify
    assert (installed / "manifest.json").read_bytes() == (adapter_kit["base"] / "manifest.json").read_bytes()
    bundle = open_bundle(installed, key=public)
    assert [a.manifest.name for a in bundle.added] == ["helpdesk"] and bundle.signed
    [row] = list_installed(store)
    assert row.adapters == ("helpdesk",) and row.signed
    np.testing.assert_array_equal(_logits(installed, "helpdesk"), _logits(adapter_kit["refs"]["first"], "helpdesk"))
    np.testing.assert_array_equal(_logits(installed, None), _logits(adapter_kit["base"], None))
    kw = dict(max_new_tokens=12, temperature=0, adapter="helpdesk")
    assert jishi.load(installed).generate("The value", **kw).text == \
        jishi.load(adapter_kit["refs"]["first"]).generate("The value", **kw).text

    # a new delivery of the same adapter replaces it
    second = install(adapter_kit["archives"]["second"], prefix=store, key=public)
    assert [p.name for p in (second / "added").iterdir()] == ["helpdesk"] and not installed.exists()
    np.testing.assert_array_equal(_logits(second, "helpdesk"), _logits(adapter_kit["refs"]["second"], "helpdesk"))
    assert not np.array_equal(_logits(second, "helpdesk"), _logits(adapter_kit["refs"]["first"], "helpdesk"))


def test_a_delivered_adapter_whose_file_changed_is_refused_at_load(tmp_path, adapter_kit, keys, store):
    installed = install(adapter_kit["archives"]["first"], prefix=store)
    copy = tmp_path / "copy"
    shutil.copytree(installed, copy)
    weights = copy / "added" / "helpdesk" / "helpdesk.onnx_adapter"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="helpdesk.onnx_adapter does not match its sha256 in adapter.json"):
        jishi.load(copy)
    (copy / "added" / "helpdesk" / "adapter.sig").unlink()
    weights.write_bytes((installed / "added" / "helpdesk" / "helpdesk.onnx_adapter").read_bytes())
    assert not open_bundle(copy).signed  # an unsigned delivery makes the whole model unsigned
    with pytest.raises(SignatureError, match="the adapter is not signed, but a key was given"):
        open_bundle(copy, key=keys[0][1])  # the bundle's own signature is fine; the adapter has none


def _adapter_entries(archive: Path, change=None, drop=()) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if change:
                data = change(m.name, data)
            if m.name in drop:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            out.append((info, data))
    return out


def _adapter_json_edit(edit):
    def change(name, data):
        if name != "adapter.json":
            return data
        body = json.loads(data)
        edit(body)
        return json.dumps(body).encode()
    return change


def _wrong_shapes(kit):
    wide = kit["wide_file"].read_bytes()

    def change(name, data):
        if name == "helpdesk.onnx_adapter":
            return wide
        if name == "adapter.json":
            body = json.loads(data)
            body["files"]["helpdesk.onnx_adapter"] = {"size": len(wide), "sha256": __import__("hashlib").sha256(wide).hexdigest()}
            return json.dumps(body).encode()
        return data
    return _adapter_entries(kit["archives"]["unsigned"], change)


def _file_outside(body):
    body["files"] = {"../helpdesk.onnx_adapter": body["files"]["helpdesk.onnx_adapter"]}
    body["adapter"]["file"] = "../helpdesk.onnx_adapter"


ADAPTER_CASES = {
    # name: (entries from the kit, install with the key?, error, message)
    "flipped byte in the adapter": (lambda k: _adapter_entries(k["archives"]["unsigned"], _flip("helpdesk.onnx_adapter")),
                                    False, BundleError, "helpdesk.onnx_adapter does not match its sha256 in adapter.json"),
    "signed with another key": (lambda k: _adapter_entries(k["archives"]["other key"]), True, SignatureError,
                                "the adapter's signature does not match the key school.pub"),
    "not signed, key given": (lambda k: _adapter_entries(k["archives"]["unsigned"]), True, SignatureError,
                              "the adapter is not signed, but a key was given"),
    "changed after signing": (lambda k: _adapter_entries(k["archives"]["first"], _adapter_json_edit(
        lambda b: b["adapter"].update(alpha=64))), True, SignatureError, "changed after signing, or signed with another key"),
    "parent traversal": (lambda k: _adapter_entries(k["archives"]["unsigned"]) + [_extra("../jishi-escape")], False,
                         BundleError, "leaves the bundle"),
    "symlink": (lambda k: _adapter_entries(k["archives"]["unsigned"]) + [_special("link", tarfile.SYMTYPE, "/etc/passwd")],
                False, BundleError, "a link"),
    "manifest names a file outside": (lambda k: _adapter_entries(k["archives"]["unsigned"], _adapter_json_edit(_file_outside)),
                                      False, BundleError, "must list exactly one file, helpdesk.onnx_adapter"),
    "extra file": (lambda k: _adapter_entries(k["archives"]["unsigned"]) + [_extra("run_me.py", b"import os")], False,
                   BundleError, "run_me.py is in the adapter but not in its adapter.json"),
    "missing file": (lambda k: _adapter_entries(k["archives"]["unsigned"], drop=("helpdesk.onnx_adapter",)), False,
                     BundleError, "listed in adapter.json but missing"),
    "unknown format version": (lambda k: _adapter_entries(k["archives"]["unsigned"], _adapter_json_edit(
        lambda b: b.update(format_version=9))), False, BundleError, "adapter format version 9 is not supported"),
    "for another base": (lambda k: _adapter_entries(k["archives"]["other base"]), False, AdapterError,
                         "adapter 'helpdesk' was made for another base: base sha256 .*, this model's is .*jishi pack BUNDLE --adapter helpdesk"),
    "for a model not installed": (lambda k: _adapter_entries(k["archives"]["unsigned"], _adapter_json_edit(
        lambda b: b.update(bundle="elsewhere"))), False, AdapterError, "for the model 'elsewhere', which is not installed"),
    "wrong shapes": (_wrong_shapes, False, AdapterError, r"expected \(64, r\).*made for another base; nothing was changed"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter_archive_is_refused_and_the_installed_model_stays(case, tmp_path, adapter_kit, keys, store):
    make, with_key, error, message = ADAPTER_CASES[case]
    archive = _tar(tmp_path / "bad.jishi", make(adapter_kit))
    before = installed_path("tiny", store)
    manifest = (before / "manifest.json").read_bytes()
    with pytest.raises(error, match=message):
        install(archive, prefix=store, key=keys[0][1] if with_key else None)
    assert not Path("/tmp/jishi-escape").exists()
    bundle = assert_store_unchanged(store, before)
    assert bundle.manifest_bytes == manifest and bundle.added == ()


def test_adapter_for_a_model_without_merge_points_is_refused(adapter_kit, versions, prefix):
    before = installed_path("tiny", prefix)  # v1: fp32, no merge points
    with pytest.raises(AdapterError, match="'tiny' was built without merge points, so it cannot take the adapter "
                                           "'helpdesk'.*--merge-points"):
        install(adapter_kit["archives"]["unsigned"], prefix=prefix)
    assert_store_unchanged(prefix, before)
    assert_v1_intact(prefix, versions)


def test_same_base_by_base_hash(adapter_kit):
    """With a base hash on both sides an adapter fits any build of that base; another hash is refused."""
    from dataclasses import replace

    from jishi.runtime.adapter_delivery import AdapterManifest, check_same_base

    m = open_bundle(adapter_kit["refs"]["first"]).manifest
    with tarfile.open(adapter_kit["archives"]["unsigned"]) as tar:
        am = AdapterManifest.from_json(tar.extractfile("adapter.json").read())
    hashed = replace(m, provenance={**m.provenance, "base_sha256": "ab" * 32})
    other_build = replace(hashed, files={**m.files, "model.onnx": replace(m.files["model.onnx"], sha256="00" * 32)})
    check_same_base(replace(am, base={**am.base, "base_sha256": "ab" * 32}), other_build)
    with pytest.raises(AdapterError, match="made for another base: base sha256 cdcdcdcdcdcd…, this model's is abababababab…"):
        check_same_base(replace(am, base={**am.base, "base_sha256": "cd" * 32}), other_build)
    with pytest.raises(AdapterError, match="made for another base: its model shape differs \\(num_layers 3 vs 2\\)"):
        check_same_base(replace(am, base={**am.base, "config": {**am.base["config"], "num_layers": 3}}), m)


@pytest.mark.parametrize("step", ["unpacked", "verified", "linked", "placed"])
def test_adapter_install_interrupted_after_each_step_keeps_the_model(step, adapter_kit, store):
    archive = adapter_kit["archives"]["unsigned"]
    before = installed_path("tiny", store)

    def interrupt(at):
        if at == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        install(archive, prefix=store, hook=interrupt)
    assert installed_path("tiny", store) == before
    assert open_bundle(before).added == ()
    assert jishi.load(before).adapters == []
    installed = install(archive, prefix=store)  # cleans up and succeeds
    assert jishi.load(installed).adapters == ["helpdesk"]
    assert sorted(p.name for p in (store / "models").iterdir()) == sorted([installed.name, "tiny.current"])


def test_adapter_install_killed_at_random_moments_never_shows_half_an_adapter(adapter_kit, store):
    archive = adapter_kit["archives"]["first"]
    script = (f"import sys; sys.argv = ['jishi', 'install', {str(archive)!r}, '--prefix', {str(store)!r}]; "
              "from jishi.cli import main; main()")
    rng = random.Random(1)
    outcomes = set()
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = installed_path("tiny", store)
        assert path is not None, "no version active after a kill"
        adapters = tuple(a["name"] for a in open_bundle(path).manifest.adapters)  # every hash checked
        outcomes.add(adapters)
        if adapters:  # the delivery completed: go back to the bare model to try again
            install(adapter_kit["base_archive"], prefix=store)
    assert outcomes <= {(), ("helpdesk",)}
    path = install(archive, prefix=store)
    assert jishi.load(path).generate("Hi", max_new_tokens=2, temperature=0, adapter="helpdesk").completion_tokens == 2


def test_cli_pack_verify_install_list_an_adapter(tmp_path, adapter_kit, keys, store):
    (private, public), _ = keys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jishi.cli", *args], capture_output=True, text=True, timeout=300)

    out = tmp_path / "helpdesk.jishi"
    done = cli("pack", str(adapter_kit["refs"]["first"]), "--adapter", "helpdesk", "-o", str(out), "--sign", str(private))
    assert done.returncode == 0, done.stderr
    done = cli("verify", str(out), "--key", str(public))
    assert done.returncode == 0, done.stderr
    assert "OK  adapter helpdesk for tiny: rank 4, q,k,v,o,gate,up,down" in done.stdout
    assert "every sha256 matches; signature valid (school.pub)" in done.stdout
    done = cli("pack", str(adapter_kit["base"]), "--adapter", "nope", "-o", str(tmp_path / "x.jishi"))
    assert done.returncode == 1 and "the bundle has no adapter 'nope'; it has: none" in done.stderr
    done = cli("install", str(out), "--prefix", str(store), "--key", str(public))
    assert done.returncode == 0, done.stderr
    assert "(adapters: helpdesk)" in done.stdout
    listed = cli("list", "--prefix", str(store))
    assert listed.returncode == 0
    [row] = [line for line in listed.stdout.splitlines() if line.startswith("tiny")]
    assert row.split()[4:6] == ["yes", "helpdesk"]
