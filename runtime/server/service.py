"""A systemd unit that starts `jishi serve` at boot (no web stack needed to write it)."""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")


def unit_name(model: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name).strip("-.") or "model"
    return f"jishi-{stem}.service"


def _quote(arg: str) -> str:
    """One argument of ExecStart: systemd splits like a shell, and treats % and $ itself."""
    return shlex.quote(arg).replace("%", "%%").replace("$", "$$")


def unit_text(model: str, serve_args: list[str], user: str, python: str, env: dict[str, str]) -> str:
    exec_start = " ".join(_quote(a) for a in [python, "-m", "jishi", "serve", model, *serve_args])
    lines = [
        "[Unit]",
        f"Description=jishi offline assistant ({Path(model).name})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"ExecStart={exec_start}",
        *(f"Environment={_quote(f'{k}={v}')}" for k, v in sorted(env.items())),
        "Restart=on-failure",
        "RestartSec=5",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def install_service(model: str, serve_args: list[str], unit_dir: str | os.PathLike | None = None,
                    user: str | None = None, out=None) -> Path | None:
    """Write the unit (and enable it, as root with systemctl); else print it and what to run."""
    from jishi.runtime.store import data_dir

    out = out or sys.stdout
    path = Path(model).expanduser()
    model_arg = str(path.resolve()) if path.exists() else model  # a path stays valid from any directory
    user = user or os.environ.get("SUDO_USER") or getpass.getuser()
    env = {"JISHI_HOME": str(data_dir())} if not path.exists() else {}  # where installed names are looked up
    text = unit_text(model_arg, serve_args, user, sys.executable, env)
    name = unit_name(model_arg)
    commands = ["sudo systemctl daemon-reload", f"sudo systemctl enable --now {name}"]
    if unit_dir is not None:
        target = Path(unit_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, text, secret="--api-key" in serve_args)
        print(f"wrote {target}; to have systemd start it at boot, copy it to {SYSTEM_UNIT_DIR}/ and run:\n  "
              + "\n  ".join(commands), file=out)
        return target
    systemctl = shutil.which("systemctl")
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or systemctl is None:
        why = "systemctl is not on this machine" if systemctl is None else "writing a system unit needs root"
        print(f"# {why}: save this as {SYSTEM_UNIT_DIR / name}\n{text}\n# then run:\n  " + "\n  ".join(commands), file=out)
        return None
    target = SYSTEM_UNIT_DIR / name
    _write(target, text, secret="--api-key" in serve_args)
    for cmd in ([systemctl, "daemon-reload"], [systemctl, "enable", "--now", name]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            from jishi.errors import JishiError

            raise JishiError(f"wrote {target}, but `{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")
    print(f"installed and started {name} ({target}); `systemctl status {name}` shows it, "
          f"`journalctl -u {name}` its log", file=out)
    return target


def _write(target: Path, text: str, secret: bool) -> None:
    """Write the unit; one holding an API key is readable by its owner only."""
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
