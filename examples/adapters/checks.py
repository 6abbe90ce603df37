"""Automatic checks for the demo adapter behaviours.

    has_behaviour("farm-notes", text) -> bool
    has_behaviour("helpdesk", text) -> bool

Run as a script to check every answer in the data files:

    python examples/adapters/checks.py
"""

import json
import re
import sys
from pathlib import Path

FARM_KEYS = {"crop", "issue", "severity", "action"}
SEVERITIES = {"low", "medium", "high"}
CLOSING = "If that does not work, ask your teacher."
MAX_STEP_WORDS = 20
_STEP = re.compile(r"^([123])\. (\S.*)$")


def is_farm_note(text: str) -> bool:
    """One line of JSON: an object with exactly crop, issue, severity, action,
    all strings, and severity one of low, medium, high."""
    s = text.strip()
    if not s or "\n" in s:
        return False
    try:
        obj = json.loads(s)
    except ValueError:
        return False
    if not isinstance(obj, dict) or set(obj) != FARM_KEYS:
        return False
    if not all(isinstance(v, str) for v in obj.values()):
        return False
    return obj["severity"] in SEVERITIES


def is_helpdesk(text: str) -> bool:
    """Exactly three numbered one-sentence steps of at most 20 words each,
    then the closing line, and nothing else."""
    lines = [line.rstrip() for line in text.strip().split("\n")]
    if len(lines) != 4 or lines[3] != CLOSING:
        return False
    for n, line in enumerate(lines[:3], 1):
        m = _STEP.match(line)
        if not m or int(m.group(1)) != n:
            return False
        step = m.group(2)
        if len(step.split()) > MAX_STEP_WORDS:
            return False
        # One sentence: it ends with a full stop and has no other sentence end inside.
        if not step.endswith(".") or re.search(r"[.!?]\s", step):
            return False
    return True


CHECKERS = {"farm-notes": is_farm_note, "helpdesk": is_helpdesk}


def has_behaviour(name: str, text: str) -> bool:
    return CHECKERS[name](text)


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = 0
    for name in CHECKERS:
        for split in ("train", "heldout"):
            path = here / name / f"{split}.jsonl"
            if not path.exists():
                print(f"{name}/{split}: missing")
                failed += 1
                continue
            total = ok = 0
            for line in path.read_text(encoding="utf-8").splitlines():
                msgs = json.loads(line)["messages"]
                for m in msgs:
                    if m["role"] != "assistant":
                        continue
                    total += 1
                    if has_behaviour(name, m["content"]):
                        ok += 1
                    else:
                        print(f"  FAIL {name}/{split}: {m['content']!r}")
            failed += total - ok
            print(f"{name}/{split}: {ok}/{total} answers pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
