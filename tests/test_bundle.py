"""A bundle is verified before anything in it is parsed, and bad ones are refused clearly."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jishi.errors import BundleError, ContextLengthError
from jishi.runtime.bundle import external_data_locations, open_bundle


@pytest.fixture
def bundle(tmp_path, tiny_bundles):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["int4"], copy)
    return copy


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path, body):
    (path / "manifest.json").write_text(json.dumps(body))


def test_a_good_bundle_opens_and_lists_every_file(bundle):
    b = open_bundle(bundle)
    # the graph for plain requests and the one with merge points, over one weights file
    assert set(b.manifest.files) == {"model.onnx", "model.lora.onnx", "model.onnx.data", "tokenizer.json"}
    assert b.manifest.graph.quantization["name"] == "int4" and b.manifest.merge_points["graph"] == "model.lora.onnx"


def test_missing_path(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nowhere")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(BundleError, match="has no manifest.json: not a jishi bundle"):
        open_bundle(tmp_path)


def test_missing_file(bundle):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is listed in the manifest but missing"):
        open_bundle(bundle)


def test_flipped_byte_is_caught_by_the_hash(bundle):
    data = bundle / "model.onnx.data"
    with open(data, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(BundleError, match="model.onnx.data does not match its sha256"):
        open_bundle(bundle)


def test_truncated_file(bundle):
    with open(bundle / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError, match="model.onnx.data is 100 bytes, the manifest says"):
        open_bundle(bundle)


def test_unknown_format_version(bundle):
    body = _manifest(bundle)
    body["format_version"] = 99
    _write_manifest(bundle, body)
    with pytest.raises(BundleError, match="bundle format version 99 is not supported"):
        open_bundle(bundle)


def test_not_json(bundle):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        open_bundle(bundle)


def test_malformed_field(bundle):
    body = _manifest(bundle)
    del body["config"]["num_layers"]
    _write_manifest(bundle, body)
    with pytest.raises(BundleError, match="ModelConfig lacks num_layers"):
        open_bundle(bundle)


@pytest.mark.parametrize("evil", ["../outside.bin", "/etc/passwd", "a/../../b", "C:/x", "sub\\..\\..\\x"])
def test_manifest_path_leaving_the_bundle(bundle, evil):
    body = _manifest(bundle)
    body["files"][evil] = {"size": 1, "sha256": "0" * 64}
    _write_manifest(bundle, body)
    with pytest.raises(BundleError, match="a path that leaves the bundle"):
        open_bundle(bundle)


def test_symlinked_file_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(bundle / "tokenizer.json", outside)
    (bundle / "tokenizer.json").unlink()
    os.symlink(outside, bundle / "tokenizer.json")
    with pytest.raises(BundleError, match="symbolic link"):
        open_bundle(bundle)


def test_unlisted_file_is_refused(bundle):
    (bundle / "extra.py").write_text("print('hi')")
    with pytest.raises(BundleError, match="extra.py is in the bundle but not in its manifest"):
        open_bundle(bundle)


def _rewrite_graph_location(bundle, location):
    """Point the graph's external data at ``location`` and re-hash it, as an attacker would."""
    import hashlib

    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(bundle / "model.onnx"))
    body = _manifest(bundle)
    raw = (bundle / "model.onnx").read_bytes()
    body["files"]["model.onnx"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    _write_manifest(bundle, body)


@pytest.mark.parametrize("location", ["../model.onnx.data", "/etc/passwd", "other.data"])
def test_external_data_outside_the_bundle_is_refused_before_onnxruntime_sees_it(bundle, location):
    _rewrite_graph_location(bundle, location)
    with pytest.raises(BundleError, match="(leaves the bundle|not a file of the bundle)"):
        open_bundle(bundle)


def test_external_data_reader_agrees_with_onnx(bundle):
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    theirs = {e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"}
    assert external_data_locations((bundle / "model.onnx").read_bytes()) == theirs == {"model.onnx.data"}


def test_prompt_past_the_context(tiny_bundles):
    import jishi

    m = jishi.load(tiny_bundles["fp32"], context=64)
    long_prompt = "word " * 200
    with pytest.raises(ContextLengthError, match="context window is 64; shorten the prompt"):
        m.generate(long_prompt, max_new_tokens=4)
    r = m.generate(long_prompt, max_new_tokens=4, temperature=0, truncate=True)
    assert r.prompt_tokens <= 64 and r.completion_tokens == 4 and r.finish_reason == "length"


def test_context_larger_than_built_is_refused(tiny_bundles):
    import jishi

    with pytest.raises(ContextLengthError, match="between 1 and the bundle's 256 tokens"):
        jishi.load(tiny_bundles["fp32"], context=10_000)


def test_files_that_usb_sticks_and_file_managers_add_are_ignored(bundle):
    for name in (".DS_Store", "._model.onnx", "Thumbs.db"):
        (bundle / name).write_bytes(b"\0junk")
    assert open_bundle(bundle).manifest.name


def test_build_never_writes_over_something_that_is_not_a_bundle(tiny_dirs, tmp_path):
    from jishi.errors import JishiError
    from jishi.pipeline import build

    precious = tmp_path / "my-documents"
    precious.mkdir()
    (precious / "letter.txt").write_text("keep me")
    with pytest.raises(JishiError, match="exists and is not a jishi bundle; choose another output path"):
        build(str(tiny_dirs["llama"]), "fp32", precious, context=64, evaluate=False, quiet=True)
    assert (precious / "letter.txt").read_text() == "keep me" and len(list(precious.iterdir())) == 1
    # an existing bundle is replaced whole
    out = build(str(tiny_dirs["llama"]), "fp32", tmp_path / "b", context=64, evaluate=False, quiet=True)
    again = build(str(tiny_dirs["llama"]), "int8", out, context=64, evaluate=False, quiet=True)
    assert open_bundle(again).manifest.graph.quantization["name"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "my-documents"]
