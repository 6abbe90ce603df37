"""The folders map into one ``jishi`` namespace in a regular (wheel) install and an editable one."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_editable_install_imports_from_the_top_level_folders():
    import jishi.devices.cpu
    import jishi.export.graph
    import jishi.runtime.engine

    assert Path(jishi.runtime.engine.__file__).resolve() == ROOT / "runtime" / "engine.py"
    assert Path(jishi.export.graph.__file__).resolve() == ROOT / "export" / "graph.py"
    assert Path(jishi.devices.cpu.__file__).resolve() == ROOT / "devices" / "cpu.py"


def test_wheel_holds_every_module_under_jishi_and_imports_from_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("jishi-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("runtime", "runtime"), ("export", "export"), ("distill", "distill"), ("devices", "devices"), ("src/jishi", None)):
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder).as_posix()
            inside = f"jishi/{package}/{rel}" if package else f"jishi/{rel}"
            assert inside in names, f"{inside} missing from the wheel"
    assert not any(n.startswith(("tests/", "bench/", "runtime/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import jishi.runtime.engine as e, jishi.cli; print(e.__file__)"
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(site))


def test_wheelhouse_installs_with_no_network(tmp_path):
    """The wheels gathered for this platform install into a fresh environment with --no-index."""
    import os
    import platform

    if platform.machine() != "x86_64":
        import pytest

        pytest.skip("the offline install is checked for linux-x86_64 on x86-64 machines")
    done = subprocess.run([sys.executable, "-m", "jishi.cli", "wheelhouse", "--platform", "linux-x86_64",
                           "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "-o", str(tmp_path / "wh")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    names = {p.name.split("-")[0].lower() for p in (tmp_path / "wh").glob("*.whl")}
    assert {"jishi", "numpy", "onnxruntime", "tokenizers", "jinja2", "cryptography"} <= names
    assert "torch" not in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", str(tmp_path / "wh"), "jishi"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stderr
    check = subprocess.run([str(venv / "bin" / "jishi"), "devices", "detect"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "architecture     x86_64" in check.stdout, check.stderr


def test_installed_wheel_runs_from_the_checkouts_root(tmp_path):
    """`pip install .` into a fresh environment, then Python and the `jishi` command started from the checkout's
    root: nothing at the root may shadow the installed package (a top-level jishi/ folder once did)."""
    import os
    import sysconfig

    assert not (ROOT / "jishi").exists(), "a jishi/ folder at the root shadows the installed package"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("jishi-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The fresh environment borrows this one's third-party packages (a path entry, not its .pth hooks,
    # so not its editable jishi), and gets jishi from the wheel alone.
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr
    code = "import jishi, jishi.runtime.engine, jishi.cli; print(jishi.__file__); print(jishi.runtime.engine.__file__)"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(str(site)) for line in done.stdout.split()), done.stdout
    smoke = subprocess.run([str(venv / "bin" / "jishi"), "devices", "detect"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=env)
    assert smoke.returncode == 0 and "closest profile" in smoke.stdout, smoke.stderr
