"""A model's own defaults: system prompt, sampling values, stops and answer length.

Stored in the bundle's manifest (``"defaults"``), so they travel with the bundle and an
installed model; every front end (``generate``/``chat``, `jishi run/chat`, the OpenAI and
Ollama routes, the chat page) uses them where a request says nothing. Where they come from,
later winning:

1. jishi's own (``BUILTIN``): temperature 0.7, top-k 40, top-p 0.95, min-p 0, repetition
   penalty 1.1;
2. the base model's ``generation_config.json``, when its directory has one: the sampling
   values it sets (read at build time);
3. what someone set with `jishi defaults BUNDLE --temperature ...`.

Changing them rewrites the manifest, which drops a signature (sign the bundle again).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from jishi.errors import BundleError, JishiError
from jishi.runtime.sampling import SamplingParams

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
# generation_config.json's names for them
FROM_GENERATION_CONFIG = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                          "repetition_penalty": "repetition_penalty"}


@dataclass(frozen=True)
class Defaults:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    system_prompt: str | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None

    def __post_init__(self):
        try:
            self.sampling()
        except ValueError as e:
            raise JishiError(f"bad model default: {e}") from None
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise JishiError("the default system prompt must be text")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise JishiError("default stops must be non-empty strings")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise JishiError(f"the default max_tokens must be a whole number >= 1, got {self.max_tokens!r}")

    def sampling(self, **given) -> SamplingParams:
        """SamplingParams from these defaults, with the values a request gave (None: not given)."""
        values = {k: getattr(self, k) for k in SAMPLING}
        values.update({k: v for k, v in given.items() if v is not None})
        return SamplingParams(**values)

    def changed(self) -> dict:
        """What differs from jishi's own defaults (what the manifest stores)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v != getattr(BUILTIN, f.name):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


BUILTIN = Defaults()


def from_dict(body: dict | None, where: str = "the manifest") -> Defaults:
    body = dict(body or {})
    known = {f.name for f in fields(Defaults)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BundleError(f"{where} has unknown defaults {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "stop" in body:
        if not isinstance(body["stop"], list):
            raise BundleError(f"{where}: default 'stop' must be a list of strings")
        body["stop"] = tuple(body["stop"])
    try:
        return replace(BUILTIN, **body)
    except (JishiError, TypeError) as e:
        raise BundleError(f"{where}: {e}") from None


def of(manifest) -> Defaults:
    return from_dict(getattr(manifest, "defaults", None))


def from_generation_config(base_dir) -> dict:
    """The sampling values a Hugging Face directory's generation_config.json sets (others left out)."""
    path = Path(base_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        gc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for ours, theirs in FROM_GENERATION_CONFIG.items():
        v = gc.get(theirs)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[ours] = int(v) if ours == "top_k" else float(v)
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0  # its authors decode it greedily (transformers ignores the values then)
    try:
        return replace(BUILTIN, **out).changed()
    except JishiError:
        return {}  # values jishi would refuse: keep its own


def write(bundle_dir, manifest, defaults: Defaults) -> bool:
    """Store ``defaults`` in the bundle's manifest; True if a signature was dropped."""
    from jishi.runtime.manifest import MANIFEST, SIGNATURE

    root = Path(bundle_dir)
    updated = replace(manifest, defaults=defaults.changed())
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_bytes(updated.to_json())
    os.replace(tmp, root / MANIFEST)
    sig = root / SIGNATURE
    if sig.exists():
        sig.unlink()
        return True
    return False


def describe(defaults: Defaults) -> list[tuple[str, str]]:
    rows = []
    for k, v in asdict(defaults).items():
        mark = "" if v == getattr(BUILTIN, k) else "  (set)"
        shown = "none" if v is None or v == () else (", ".join(map(repr, v)) if isinstance(v, tuple) else str(v))
        rows.append((k, shown + mark))
    return rows
