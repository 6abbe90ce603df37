"""Quantization into MatMulNBits: grids recovered exactly, packing as onnxruntime reads it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from jishi.export.quant import concat_outputs, quantize_asymmetric, quantize_symmetric_int8


def q4_1_weights(rng, n=48, k=128):
    """Weights as a Q4_1 GGUF stores them: fp16 scale and minimum per block of 32, codes 0..15."""
    d = (np.abs(rng.standard_normal((n, k // 32))) * 0.01 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-rng.uniform(0, 15, (n, k // 32)) * d).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[:, :, 3], q[:, :, 7] = 0, 15  # the quantizer puts the block's min at 0 and max at 15
    return (d[:, :, None] * q + m[:, :, None]).reshape(n, k).astype(np.float32)


def q8_0_weights(rng, n=40, k=96):
    d = (np.abs(rng.standard_normal((n, k // 32))) * 0.01 + 1e-3).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (n, k // 32, 32))
    q[:, :, 0] = 127
    return (d[:, :, None] * q).reshape(n, k).astype(np.float32)


def run_matmul_nbits(qw, x, accuracy_level=0):
    inits = [numpy_helper.from_array(qw.packed, "B"), numpy_helper.from_array(qw.scales.reshape(-1), "S"),
             numpy_helper.from_array(qw.zero_points, "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft",
                            K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, qw.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    if qw.correction is not None:
        y = y + x.reshape(x.shape[0], -1, qw.block).sum(-1) @ qw.correction
    return y


def test_q4_1_grid_is_recovered_exactly():
    w = q4_1_weights(np.random.default_rng(0))
    qw = quantize_asymmetric(w, bits=4, block=32, correct=True)
    np.testing.assert_allclose(qw.dequantize(), w, atol=2e-7, rtol=0)


def test_q8_0_grid_is_recovered_exactly():
    w = q8_0_weights(np.random.default_rng(1))
    qw = quantize_symmetric_int8(w)
    np.testing.assert_allclose(qw.dequantize(), w, atol=1e-7, rtol=0)


def test_rounded_zero_points_alone_shift_the_grid():
    """Without the correction the Q4_1 minimum is rounded: the error the correction removes."""
    w = q4_1_weights(np.random.default_rng(2))
    plain = quantize_asymmetric(w, bits=4, block=32, correct=False)
    assert np.abs(plain.dequantize() - w).max() > 1e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_onnxruntime_reads_the_packing_as_dequantize_says(bits):
    rng = np.random.default_rng(3)
    w = q4_1_weights(rng) if bits == 4 else rng.standard_normal((48, 128)).astype(np.float32) * 0.05
    qw = quantize_asymmetric(w, bits=bits, block=32, correct=bits == 4)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(run_matmul_nbits(qw, x), x @ qw.dequantize().T, atol=2e-5, rtol=0)
    if bits == 4:  # and the corrected product is the exact Q4_1 product
        np.testing.assert_allclose(run_matmul_nbits(qw, x), x @ w.T, atol=2e-5, rtol=0)


def test_fused_weights_equal_their_parts():
    rng = np.random.default_rng(4)
    parts = [quantize_asymmetric(q4_1_weights(rng, n=n), 4, 32) for n in (32, 16, 16)]
    fused = concat_outputs(parts)
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([p.dequantize() for p in parts]))


def test_odd_block_count_zero_points_pack_per_row():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 96)).astype(np.float32)  # 3 blocks per row: padded nibble
    qw = quantize_asymmetric(w, 4, 32, correct=False)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    np.testing.assert_allclose(run_matmul_nbits(qw, x), x @ qw.dequantize().T, atol=2e-5, rtol=0)


def test_input_size_must_divide_into_blocks():
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        quantize_asymmetric(np.zeros((4, 40), np.float32))
