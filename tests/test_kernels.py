"""Setting MatMulNBits' accuracy level on a built bundle: the same weights, another kernel path."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import jishi
from jishi.errors import BundleError
from jishi.export.kernels import set_accuracy_level
from jishi.runtime.bundle import open_bundle


def _levels(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}


def test_level_0_over_the_same_weights_equals_a_level_0_build(tiny_bundles, tiny_dirs, tmp_path):
    from jishi.pipeline import build

    src = tiny_bundles["int4"]
    flipped = shutil.copytree(src, tmp_path / "flipped")
    data = open_bundle(src).manifest.graph.data_file
    assert _levels(flipped / "model.onnx") == {open_bundle(src).manifest.graph.quantization["accuracy_level"]}
    set_accuracy_level(flipped, 4)  # the build's default (a run with --accuracy-level 0 starts from 0)
    assert _levels(flipped / "model.onnx") == {4}
    assert set_accuracy_level(flipped, 0) > 0
    assert _levels(flipped / "model.onnx") == {0}
    assert (flipped / data).read_bytes() == (src / data).read_bytes()  # the weights are untouched
    b = open_bundle(flipped)  # every hash still checks
    assert b.manifest.graph.quantization["accuracy_level"] == 0
    built = build(str(tiny_dirs["llama"]), "int4", tmp_path / "built", context=256, evaluate=False, quiet=True,
                  accuracy_level=0)
    ids = list(range(5, 60))
    got = jishi.load(flipped, threads=1).engine.feed(ids, all_logits=True)
    want = jishi.load(built, threads=1).engine.feed(ids, all_logits=True)
    np.testing.assert_array_equal(got, want)
    assert set_accuracy_level(flipped, 0) == 0  # already there: nothing to do


def test_setting_a_level_drops_the_signature_and_refuses_unknown_levels(tiny_bundles, tmp_path):
    from jishi.export.signing import keygen, sign_bundle

    b = shutil.copytree(tiny_bundles["int4"], tmp_path / "b")
    private, _ = keygen(tmp_path / "key")
    sign_bundle(b, private)
    assert open_bundle(b).signed
    set_accuracy_level(b, 0 if open_bundle(b).manifest.graph.quantization["accuracy_level"] else 4)
    assert not open_bundle(b).signed
    with pytest.raises(BundleError, match="accuracy level must be one of"):
        set_accuracy_level(b, 7)
