"""Giving back the weights file's pages after load: the pages leave the process's resident memory,
what is read again comes back, and the model computes the same logits."""

from __future__ import annotations

import mmap
import sys
from dataclasses import replace

import numpy as np
import pytest

from jishi.runtime.memory import file_mappings, release_mapped_file

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) and /proc are Linux's")


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    import os

    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and all(c in "0123456789abcdef-" for c in head[0]):
                inside = len(head) == 6 and head[5].strip() == target
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@linux
def test_a_private_mapping_is_paged_out_and_reads_back_the_same(tmp_path):
    path = tmp_path / "weights.data"
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, as onnxruntime maps initializers
        view = np.frombuffer(m, np.uint8)
        assert int(view[::4096].sum()) >= 0  # touch every page
        before = _mapped_rss(path)
        assert before >= 7 << 20
        assert [e - s for s, e in file_mappings(path)] == [8 << 20]
        released = release_mapped_file(path)
        if released == 0:
            pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
        assert released == 8 << 20
        assert _mapped_rss(path) < before // 8
        np.testing.assert_array_equal(view, data)  # read again: the file's bytes
        del view
        m.close()


def test_nothing_is_released_for_a_file_that_is_not_mapped(tmp_path):
    path = tmp_path / "never-mapped.data"
    path.write_bytes(b"\0" * 4096)
    assert file_mappings(path) == []
    assert release_mapped_file(path) == 0


@linux
def test_a_loaded_bundle_gives_its_weights_pages_back_and_computes_the_same(tiny_bundles, monkeypatch, tmp_path):
    import shutil

    import jishi
    from jishi.export.kernels import set_accuracy_level
    from jishi.runtime import settings as settings_mod

    # At the build's accuracy level (4: int8 activations) onnxruntime keeps pages of the weights file resident
    # after prepacking; at level 0 (as `--accuracy-level 0` runs the suite) it leaves none (measured: 22.8 MB
    # against 0 on a 47M-parameter model), so there would be nothing to give back. The level is pinned here.
    bundle = shutil.copytree(tiny_bundles["int4"], tmp_path / "int4")
    set_accuracy_level(bundle, 4)
    data = bundle / "model.onnx.data"
    ids = list(range(5, 60))
    chosen = {}
    real = settings_mod.for_this_machine
    monkeypatch.setattr(settings_mod, "for_this_machine",
                        lambda threads=None: replace(real(threads), **chosen))
    chosen["release_mapped_weights"] = False
    kept = jishi.load(bundle, threads=1)
    kept_rss = _mapped_rss(data)
    expected = kept.engine.feed(ids, all_logits=True)
    del kept
    chosen["release_mapped_weights"] = True
    m = jishi.load(bundle, threads=1)
    assert m.settings.release_mapped_weights
    after_load = _mapped_rss(data)
    assert kept_rss > 0 and after_load < kept_rss
    np.testing.assert_array_equal(m.engine.feed(ids, all_logits=True), expected)
    assert ("weights file pages", "given back after load") in m.settings.describe()
