"""Give back the pages of a bundle's weights file that onnxruntime read once, at load.

onnxruntime maps each external initializer from the weights file. MatMulNBits copies its weights
into a prepacked layout when the session is made, so most of those pages are read once, then stay
counted in the process's resident memory (clean, file-backed) until the kernel needs the room. The
tied embedding table is the largest: the LM head's prepacking reads all of it, the embedding gather
then reads one row per token. Measured on the default bundle of SmolLM2-135M (bench/token_profile.py):
29 MB of the weights file resident after load, 43 MB after a 128-token answer, of which 14 MB are
read on every step (the zero-point corrections) and the rest is the table.

``release_mapped_file`` asks Linux to page a file's mappings out now (``madvise(MADV_PAGEOUT)``,
Linux 5.4 and later). Nothing is lost: a page that is read again comes back from the page cache or
the file on its next read. Elsewhere, or on a kernel without it, it does nothing.
"""

from __future__ import annotations

import os
import sys

MADV_PAGEOUT = 21  # Linux's generic value (x86-64, arm64, arm)


def file_mappings(path: str | os.PathLike, maps: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """(start, end) of every mapping of ``path`` in this process."""
    target = os.path.realpath(path)
    out = []
    try:
        with open(maps) as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5] == target:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return out


def release_mapped_file(path: str | os.PathLike) -> int:
    """Ask the kernel to page out this process's mappings of ``path``; the bytes of mappings it took
    (0 where this is not Linux or the kernel refuses the advice)."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    done = 0
    for start, end in file_mappings(path):
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            return done  # EINVAL: a kernel older than 5.4
        done += end - start
    return done
