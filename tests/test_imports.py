"""The import rules between the rooms (DESIGN: which folder may import which), checked two ways:

- import-linter's contracts in pyproject.toml (`lint-imports`), forbidding what each room must never need;
- an allowed list per room, below: every module a room imports, at the top of a file or inside a function,
  is the standard library, one of its listed packages, or one of its listed jishi modules.

The checkout's folders become one ``jishi`` package only when installed, so both checks run on a copy laid
out as the wheel lays it out.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter is a test dependency: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {"runtime": "runtime", "export": "export", "distill": "distill", "devices": "devices"}

# room: (third-party packages, jishi modules or packages) it may import besides the standard library.
ALLOWED = {
    "jishi.errors": ((), ()),
    "jishi.heldout": ((), ()),
    "jishi.devices": ((), ("jishi.errors",)),
    # the model families: config → features, read by export and distill alike; nothing heavy
    "jishi.families": ((), ("jishi.errors", "jishi.runtime.manifest")),
    # llguidance: constrained decoding (a JSON schema, regex or grammar), a runtime feature
    "jishi.runtime": (("numpy", "onnxruntime", "tokenizers", "jinja2", "cryptography", "llguidance"),
                      ("jishi.errors", "jishi.devices")),
    "jishi.export": (("numpy", "torch", "onnx", "onnxruntime", "optimum", "safetensors", "cryptography", "tqdm"),
                     ("jishi.errors", "jishi.runtime", "jishi.devices", "jishi.distill.base", "jishi.heldout",
                      "jishi.families")),
    # the runtime's tokenizer (training sees the served prompt), its manifest schema and its atomic swap
    # tokenizers: a GGUF's vocabulary assembled into the bundle's tokenizer (it is a runtime dependency anyway)
    "jishi.distill": (("numpy", "torch", "transformers", "peft", "accelerate", "gguf", "safetensors", "sentencepiece",
                       "tokenizers", "tqdm"),
                      ("jishi.errors", "jishi.heldout", "jishi.runtime.tokenizer", "jishi.runtime.manifest",
                       "jishi.runtime.store", "jishi.devices", "jishi.families")),
}
# The server is the runtime plus its web stack (the [serve] extra).
ALLOWED["jishi.runtime.server"] = (ALLOWED["jishi.runtime"][0] + ("starlette", "uvicorn", "jsonschema"),
                                  ALLOWED["jishi.runtime"][1] + ("jishi.runtime",))


def installed_layout(dest: Path) -> Path:
    """Copy the package as a wheel installs it: src/jishi plus each room under jishi/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src" / "jishi", dest / "jishi", ignore=ignore)
    for folder, name in ROOMS.items():
        shutil.copytree(ROOT / folder, dest / "jishi" / name, ignore=ignore)
    return dest


def room_of(module: str) -> str | None:
    """The most specific room a module belongs to."""
    best = None
    for room in ALLOWED:
        if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best)):
            best = room
    return best


def violations(site: Path) -> list[str]:
    """Every import that leaves its room's allowed list, as 'module -> imported'."""
    code = ("import grimp, json, sys; g = grimp.build_graph('jishi', include_external_packages=True); "
            "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules if m.startswith('jishi')}))")
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import json

    found = []
    for module, imported in json.loads(done.stdout).items():
        room = room_of(module)
        if room is None:  # the public API, CLI and pipelines may import everything
            continue
        packages, modules = ALLOWED[room]
        for imp in imported:
            top = imp.split(".")[0]
            if top != "jishi":
                ok = top in sys.stdlib_module_names or top in packages
            else:
                ok = (room_of(imp) == room or imp == room or imp.startswith(room + ".")
                      or any(imp == m or imp.startswith(m + ".") for m in modules))
            if not ok:
                found.append(f"{module} -> {imp}")
    return sorted(found)


def lint_imports(site: Path) -> subprocess.CompletedProcess:
    env_code = (f"import sys; sys.path.insert(0, {str(site)!r}); "
                "from importlinter.cli import lint_imports_command; sys.argv = ['lint-imports', '--config', "
                f"{str(ROOT / 'pyproject.toml')!r}, '--no-cache']; lint_imports_command()")
    return subprocess.run([sys.executable, "-I", "-c", env_code], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return installed_layout(tmp_path_factory.mktemp("site"))


def test_every_room_imports_only_what_it_is_allowed(site):
    assert violations(site) == []


def test_import_linter_contracts_hold(site):
    done = lint_imports(site)
    assert done.returncode == 0, done.stdout + done.stderr
    import tomllib

    n = len(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])
    assert f"Contracts: {n} kept, 0 broken." in done.stdout


def test_a_forbidden_import_fails_both_checks(tmp_path):
    """torch imported inside a runtime function (lazily, as a shortcut might) is caught by both checks."""
    site = installed_layout(tmp_path)
    sampling = site / "jishi" / "runtime" / "sampling.py"
    sampling.write_text(sampling.read_text() + "\n\ndef _shortcut():\n    import torch\n    return torch\n")
    assert violations(site) == ["jishi.runtime.sampling -> torch"]
    done = lint_imports(site)
    assert done.returncode == 1
    assert "the runtime never needs the build stack" in done.stdout and "BROKEN" in done.stdout
    assert "jishi.runtime.sampling -> torch" in done.stdout


def test_no_script_folder_shadows_the_standard_library():
    """A script runs with its own folder first on sys.path, so bench/profile.py once hid the stdlib's
    ``profile`` (cProfile imports it) and every benchmark that imported transformers died."""
    root = Path(__file__).resolve().parent.parent
    clashes = sorted(f"{p.parent.name}/{p.name}" for folder in ("bench", "scripts", "examples")
                     for p in (root / folder).glob("*.py") if p.stem in sys.stdlib_module_names)
    assert clashes == [], f"rename these: a module of that name in the standard library is shadowed: {clashes}"
