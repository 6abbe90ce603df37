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

import pytest

import jishi
from jishi.errors import BundleError, JishiError, SignatureError
from jishi.export.pack import pack_bundle
from jishi.export.signing import keygen, sign_bundle
from jishi.runtime.bundle import open_bundle
from jishi.runtime.store import install, installed_path, list_installed, remove


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_dirs):
    """Two different bundles of one name: the installed version and its update."""
    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("versions")
    v1 = build(str(tiny_dirs["llama"]), "fp32", root / "v1", name="tiny", context=128, evaluate=False, quiet=True)
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
