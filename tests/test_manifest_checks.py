"""The manifest checked at load: a schema of types and ranges, then against the graph's own shapes."""

from __future__ import annotations

import json
import shutil

import pytest

from jishi.errors import BundleError


def _edited(src, tmp_path, section, field, value):
    b = shutil.copytree(src, tmp_path / "b")
    path = b / "manifest.json"
    body = json.loads(path.read_text())
    body[section][field] = value
    path.write_text(json.dumps(body, indent=2))
    return b


@pytest.mark.parametrize("field,value,says", [
    ("num_layers", 7, r"config\.num_layers is 7 but model\.onnx has KV cache inputs for 2 layers"),
    ("num_layers", "2", r"config\.num_layers must be integer, at least 1, found '2'"),
    ("num_layers", True, r"config\.num_layers must be integer"),
    ("vocab_size", 17, r"config\.vocab_size is 17 but model\.onnx returns logits over 384 tokens"),
    ("head_dim", 3, r"config\.head_dim must be integer, a positive even number"),
    ("head_dim", 8, r"config\.head_dim is 8 but model\.onnx caches heads of size 16"),
    ("num_kv_heads", 1, r"config\.num_kv_heads is 1 but model\.onnx caches 2 KV heads"),
    ("num_kv_heads", 3, r"config\.num_heads \(4\) is not a multiple of config\.num_kv_heads \(3\)"),
    ("hidden_size", 65, r"config\.hidden_size is 65 but model\.onnx has a final norm of width 64"),
    ("context_length", -5, r"config\.context_length must be integer, at least 1 token, found -5"),
    ("context_length", 100_000, r"config\.context_length is 100000 but model\.onnx has rotary tables for 256 positions"),
    ("rms_norm_eps", "small", r"config\.rms_norm_eps must be integer or number"),
    ("sliding_window", 0, r"config\.sliding_window must be integer, at least 1 \(or null\), found 0"),
])
def test_a_config_that_the_graph_contradicts_is_refused_at_load(tiny_bundles, tmp_path, field, value, says):
    from jishi.runtime.model import load

    b = _edited(tiny_bundles["fp32"], tmp_path, "config", field, value)
    with pytest.raises(BundleError, match=says):
        load(b)


@pytest.mark.parametrize("field,value,says", [
    ("eos_token_ids", [2, 384], r"tokenizer\.eos_token_ids holds 384, outside the vocabulary of 384"),
    ("eos_token_ids", [-1], r"tokenizer\.eos_token_ids must be list, a list of token ids"),
    ("pad_token_id", 10**6, r"tokenizer\.pad_token_id holds 1000000, outside the vocabulary"),
    ("add_bos", "yes", r"tokenizer\.add_bos must be true/false, found 'yes'"),
])
def test_token_ids_outside_the_vocabulary_are_refused(tiny_bundles, tmp_path, field, value, says):
    from jishi.runtime.bundle import open_bundle

    b = _edited(tiny_bundles["int4"], tmp_path, "tokenizer", field, value)
    with pytest.raises(BundleError, match=says):
        open_bundle(b)


def test_the_unedited_bundles_load_and_keep_their_config(tiny_bundles):
    from jishi.runtime.bundle import open_bundle

    for b in tiny_bundles.values():
        c = open_bundle(b).manifest.config
        assert (c.num_layers, c.vocab_size, c.head_dim, c.context_length) == (2, 384, 16, 256)
