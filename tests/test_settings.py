"""onnxruntime settings chosen from the device profile, and what the session really gets."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import jishi
from jishi.devices import detect as detect_mod
from jishi.devices.detect import best_profile, detect
from jishi.devices.profiles import HERE as PROFILES, get_profile
from jishi.errors import JishiError
from jishi.runtime.settings import CPU, RuntimeSettings, choose

FIXTURES = Path(__file__).parent / "fixtures" / "devices"
CUDA = "CUDAExecutionProvider"


def table(profile_id: str) -> dict:
    """The [runtime] table as the TOML file writes it, read here on its own."""
    return tomllib.loads((PROFILES / f"{profile_id}.toml").read_text())["runtime"]


@pytest.mark.parametrize("fixture, profile_id", [("rpi4-4gb", "rpi4-4gb"), ("rpi5-8gb", "rpi5-8gb"),
                                                 ("laptop-x86", "laptop-avx512vnni-16gb")])
def test_settings_for_recorded_devices_are_their_profiles(fixture, profile_id):
    machine = detect(FIXTURES / fixture, arch="x86_64" if fixture == "laptop-x86" else None)
    profile = best_profile(machine)
    assert profile.id == profile_id
    s = choose(profile, machine.cores, available=[CPU])
    rt = table(profile_id)
    assert s == RuntimeSettings(threads=min(rt["threads"], machine.cores), providers=(CPU,), cpu_mem_arena=rt["cpu_mem_arena"],
                                prepacking=rt["prepacking"], spinning=rt["spinning"], profile=profile_id, why=rt["why"])


def test_every_profile_says_what_to_use_and_why():
    for path in sorted(PROFILES.glob("*.toml")):
        rt = tomllib.loads(path.read_text())["runtime"]
        assert set(rt) == {"threads", "cpu_mem_arena", "prepacking", "spinning", "why"}, path.name
        assert isinstance(rt["threads"], int) and rt["threads"] >= 1 and len(rt["why"]) > 20, path.name


def test_the_measured_choices():
    """Arena and prepacking on everywhere (turning either off cost memory here); spinning off only on the shared build machine."""
    for p in ("rpi4-4gb", "rpi5-4gb", "laptop-avx2-8gb", "jetson-orin-nano-8gb"):
        s = choose(get_profile(p), 8, available=[CPU])
        assert (s.cpu_mem_arena, s.prepacking, s.spinning) == (True, True, True), p
    assert choose(get_profile("build-vm-2core-24gb"), 2, available=[CPU]).spinning is False
    assert choose(get_profile("rk3588-16gb"), 8, available=[CPU]).threads == 4  # the A76 cores of the 8


def test_gpu_provider_only_where_the_profile_has_a_gpu_and_onnxruntime_has_the_provider():
    jetson, pi = get_profile("jetson-orin-nano-8gb"), get_profile("rpi5-8gb")
    assert choose(jetson, 6, available=[CUDA, CPU]).providers == (CUDA, CPU)
    assert choose(jetson, 6, available=[CPU]).providers == (CPU,)  # onnxruntime without CUDA: CPU
    assert choose(pi, 4, available=[CUDA, CPU]).providers == (CPU,)  # a CUDA build on a device without a GPU
    assert choose(None, 3, available=[CUDA, CPU]) == RuntimeSettings(threads=3)


def test_threads_never_exceed_the_cores_and_an_explicit_count_wins():
    laptop = get_profile("laptop-avx512vnni-16gb")
    assert choose(laptop, 2, available=[CPU]).threads == 2  # a container with 2 of the 8 cores
    assert choose(laptop, 8, available=[CPU], threads=3).threads == 3
    with pytest.raises(JishiError, match="threads must be at least 1, got 0"):
        choose(laptop, 8, available=[CPU], threads=0)


def _session_settings(model):
    sess = model.engine.session
    o = sess.get_session_options()
    return (o.intra_op_num_threads, o.enable_cpu_mem_arena, o.get_session_config_entry("session.disable_prepacking"),
            o.get_session_config_entry("session.intra_op.allow_spinning"), tuple(sess.get_providers()))


def test_the_session_gets_the_profile_settings(tiny_bundles, monkeypatch):
    """On a machine detected as a Raspberry Pi 4 (the recorded files), the session is set up as its profile says."""
    pi = detect(FIXTURES / "rpi4-4gb")
    monkeypatch.setattr(detect_mod, "detect", lambda *a, **k: pi)
    rt = table("rpi4-4gb")
    m = jishi.load(tiny_bundles["int4"])
    assert m.settings.profile == "rpi4-4gb" and m.threads == rt["threads"]
    assert _session_settings(m) == (rt["threads"], rt["cpu_mem_arena"], "0" if rt["prepacking"] else "1",
                                    "1" if rt["spinning"] else "0", (CPU,))
    m = jishi.load(tiny_bundles["int4"], threads=1)  # the override
    assert m.threads == 1 and _session_settings(m)[0] == 1 and _session_settings(m)[1] == rt["cpu_mem_arena"]


def test_this_machine_the_session_matches_the_chosen_settings(tiny_bundles):
    m = jishi.load(tiny_bundles["fp32"], threads=2)
    s = m.settings
    assert s.threads == 2
    assert _session_settings(m) == (2, s.cpu_mem_arena, "0" if s.prepacking else "1", "1" if s.spinning else "0", s.providers)


def test_settings_give_the_same_logits(tiny_bundles, monkeypatch):
    """The arena changes where scratch lives, not what is computed; prepacking changes only the
    weights' layout for fp32. (int4 without prepacking leaves MatMulNBits' int8-activation
    kernels for an fp32 path, which is why it is both slower and not bit-identical.)"""
    import numpy as np

    from jishi.runtime import settings as settings_mod

    ids = list(range(5, 40))

    def logits(bundle, arena, prepack):
        chosen = RuntimeSettings(threads=1, cpu_mem_arena=arena, prepacking=prepack)
        monkeypatch.setattr(settings_mod, "for_this_machine", lambda threads=None: chosen)
        m = jishi.load(bundle)
        assert _session_settings(m)[:3] == (1, arena, "0" if prepack else "1")
        return m.engine.feed(ids, all_logits=True)

    np.testing.assert_array_equal(logits(tiny_bundles["int4"], False, True), logits(tiny_bundles["int4"], True, True))
    np.testing.assert_allclose(logits(tiny_bundles["fp32"], True, False), logits(tiny_bundles["fp32"], True, True),
                               atol=1e-5, rtol=0)


def test_cli_shows_the_settings(tiny_bundles):
    cli = lambda *a: subprocess.run([sys.executable, "-m", "jishi.cli", *a], capture_output=True, text=True, timeout=300)
    done = cli("devices", "detect")
    assert done.returncode == 0, done.stderr
    assert "runtime settings (onnxruntime):" in done.stdout and "CPU memory arena" in done.stdout
    done = cli("run", str(tiny_bundles["fp32"]), "Hi", "--raw", "--max-tokens", "2", "--threads", "1", "--verbose")
    assert done.returncode == 0, done.stderr
    assert "threads             1" in done.stderr and "session providers   CPUExecutionProvider" in done.stderr
    done = cli("info", str(tiny_bundles["fp32"]))
    assert done.returncode == 0 and "runtime here" in done.stdout
