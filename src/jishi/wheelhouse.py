"""``jishi wheelhouse``: every wheel the runtime needs for another machine, for a USB stick.

The device then installs with no network:

    pip install --no-index --find-links DIR jishi
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from jishi.errors import JishiError

PLATFORMS = {
    # what pip should accept for each target (newest first)
    "linux-aarch64": ["manylinux_2_28_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64"],
    "linux-x86_64": ["manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64"],
}


def _source_root() -> Path:
    here = Path(__file__).resolve().parents[2]  # src/jishi/wheelhouse.py in a checkout
    if (here / "pyproject.toml").is_file() and (here / "runtime").is_dir():
        return here
    raise JishiError("jishi wheelhouse needs jishi's source checkout (it builds jishi's own wheel from it); "
                     "run it from a clone installed with `pip install -e .`")


def _requirements(root: Path, extras: list[str]) -> list[str]:
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def build_wheelhouse(out: str | Path, platform: str, python_version: str = "3.11", serve: bool = False) -> list[Path]:
    if platform not in PLATFORMS:
        raise JishiError(f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
    root = _source_root()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(root)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise JishiError(f"building jishi's wheel failed:\n{built.stderr.strip()[-1500:]}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version, "-d", str(out)]
    for tag in PLATFORMS[platform]:
        cmd += ["--platform", tag]
    cmd += _requirements(root, ["serve"] if serve else [])
    fetched = subprocess.run(cmd, capture_output=True, text=True)
    if fetched.returncode != 0:
        lines = [l for l in fetched.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
        raise JishiError(f"fetching the runtime's wheels for {platform} failed: {lines[-1] if lines else fetched.returncode}")
    return sorted(out.glob("*.whl"))
