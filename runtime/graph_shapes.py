"""The manifest's model config checked against the graph it describes, before onnxruntime sees either.

Read straight from the ONNX protobuf (the graph's declared inputs, outputs and initializer
shapes; weights stay where they are): a manifest that claims more layers, another vocabulary,
head size, KV head count, width or context than the graph has is refused with the field's
name, instead of failing inside onnxruntime at the first token.
"""

from __future__ import annotations

import re
from pathlib import Path

from jishi.errors import BundleError
from jishi.runtime.bundle import _GRAPH_INIT, _MODEL_GRAPH, _fields, _sub, _tensor_header

_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_SHAPE, _SHAPE_DIM = 1, 2, 1
_DIM_VALUE, _DIM_PARAM = 1, 2


def _dims(value_info) -> tuple[str, list]:
    """(name, dims) of a ValueInfoProto: an int per fixed dimension, a string per named one."""
    name, dims = "", []
    for num, _, v in _fields(value_info):
        if num == _VALUE_NAME:
            name = bytes(v).decode()
        elif num == _VALUE_TYPE:
            for _, tensor in _sub(v, _TYPE_TENSOR):
                for _, shape in _sub(tensor, _TENSOR_SHAPE):
                    for _, dim in _sub(shape, _SHAPE_DIM):
                        d = None
                        for n, _, dv in _fields(dim):
                            d = dv if n == _DIM_VALUE else bytes(dv).decode() if n == _DIM_PARAM else d
                        dims.append(d)
    return name, dims


def graph_shapes(model_bytes: bytes) -> tuple[dict, dict, dict]:
    """The graph's inputs, outputs and initializers, each name -> dims."""
    inputs, outputs, inits = {}, {}, {}
    for _, graph in _sub(memoryview(model_bytes), _MODEL_GRAPH):
        for num, value in _sub(graph, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_INIT):
            if num == _GRAPH_INIT:
                name, dims, *_ = _tensor_header(value)
                inits[name] = dims
            else:
                name, dims = _dims(value)
                (inputs if num == _GRAPH_INPUT else outputs)[name] = dims
    return inputs, outputs, inits


def _refuse(field: str, claim, found: str, graph: str) -> None:
    raise BundleError(f"manifest.json: config.{field} is {claim!r} but {graph} {found}; the manifest does not "
                      "match the model: rebuild the bundle (or copy it again)")


def check_config_against_graph(config, graph_path: Path) -> None:
    try:
        inputs, outputs, inits = graph_shapes(graph_path.read_bytes())
    except ValueError as e:
        raise BundleError(f"{graph_path.name} is not a readable ONNX model ({e}); the bundle is damaged") from None
    g = graph_path.name
    layers = sorted(int(m.group(1)) for n in inputs if (m := re.fullmatch(r"past_key\.(\d+)", n)))
    if layers != list(range(config.num_layers)):
        _refuse("num_layers", config.num_layers, f"has KV cache inputs for {len(layers)} layers", g)
    kv = inputs.get("past_key.0", [])
    if len(kv) == 4:
        if isinstance(kv[1], int) and kv[1] != config.num_kv_heads:
            _refuse("num_kv_heads", config.num_kv_heads, f"caches {kv[1]} KV heads", g)
        if isinstance(kv[3], int) and kv[3] != config.head_dim:
            _refuse("head_dim", config.head_dim, f"caches heads of size {kv[3]}", g)
    logits = outputs.get("logits", [])
    if len(logits) == 2 and isinstance(logits[1], int) and logits[1] != config.vocab_size:
        _refuse("vocab_size", config.vocab_size, f"returns logits over {logits[1]} tokens", g)
    norm = inits.get("model.norm.weight")
    if norm and norm[0] != config.hidden_size:
        _refuse("hidden_size", config.hidden_size, f"has a final norm of width {norm[0]}", g)
    cos = inits.get("rope.cos")
    if cos and cos[0] < config.context_length:
        _refuse("context_length", config.context_length, f"has rotary tables for {cos[0]} positions", g)
