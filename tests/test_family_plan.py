"""The device planner on the families' shapes: head sizes that are not hidden / heads (Gemma 3),
and its memory estimate against the peak RSS of a run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

# Gemma 3's proportions at a size whose weights outweigh the runtime's own memory: 47M parameters.
GEMMA_SHAPE = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                   vocab_size=32768, max_position_embeddings=2048)
# The peak from /proc (VmHWM): ru_maxrss keeps the parent's peak across fork and exec.
RUN = """
import sys
import jishi
m = jishi.load(sys.argv[1])
m.generate("Return the value of the expression " * 20, max_new_tokens=32, temperature=0)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(m.engine.capacity, int(hwm.split()[1]) * 1024)
"""


def test_gguf_shape_reads_the_head_size_gemma_declares(tmp_path):
    from jishi.distill.base import load_config_only

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    w.add_block_count(18)
    w.add_embedding_length(640)
    w.add_feed_forward_length(2048)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(256)
    w.add_value_length(256)
    w.add_vocab_size(262_144)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shape = load_config_only(tmp_path / "g.gguf")
    assert (shape.head_dim, shape.heads, shape.kv_heads, shape.vocab, shape.tied) == (256, 4, 1, 262_144, True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_memory_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, tiny_tokenizer):
    from conftest import make_tiny
    from jishi.devices.plan import estimate
    from jishi.devices.profiles import get_profile
    from jishi.pipeline import build
    from jishi.planning import model_shape

    base = make_tiny("gemma3", tmp_path / "hf", tiny_tokenizer, layers=8, **GEMMA_SHAPE)
    bundle = build(str(base), "int4", tmp_path / "b", evaluate=False, quiet=True)
    shape = model_shape(str(bundle))
    from dataclasses import replace

    # the directory's config.json (which leaves out tie_word_embeddings: transformers' default) and the bundle agree
    assert replace(model_shape(str(base)), name=shape.name) == shape
    assert shape.head_dim == 128 and shape.tied  # not 512 / 4
    assert not shape.int4_correction  # off-grid weights, built onto integer zero points: no correction to hold
    done = subprocess.run([sys.executable, "-c", RUN, str(bundle)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    capacity, measured = map(int, done.stdout.strip().splitlines()[-1].split())
    # The cache grows in steps as the conversation does, so the run holds the KV of the positions it reached,
    # not of the full context: the estimate is compared at the capacity the run ended with.
    assert 0 < capacity < 2048
    est = estimate(shape, get_profile("build-vm-2core-24gb"), "int4", capacity)
    assert est.memory_bytes < estimate(shape, get_profile("build-vm-2core-24gb"), "int4", 2048).memory_bytes
    # measured: estimate 172 MB at the 512 positions reached, peak RSS 148 MB (+16%) on one machine, more on
    # another (how many of the shared libraries' pages a process maps depends on what the page cache holds)
    assert abs(est.memory_bytes / measured - 1) <= 0.20, (est.memory_bytes, measured)
