"""The bundle manifest: the contract between the exporter and the runtime.

``export/`` writes it through these types; ``runtime/`` reads it back and
refuses what it does not understand. Plain frozen dataclasses, JSON on disk.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from jishi.errors import BundleError

FORMAT = "jishi-bundle"
FORMAT_VERSION = 2  # 2: the graph also returns the final-norm hidden states (embeddings)
READS = (1, 2)  # version 1 bundles still generate; embed() asks for a rebuild
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


@dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | mistral | qwen2 | qwen3 | gemma3 | phi3 (jishi.families)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # the widest sliding window of any layer (features say which layers)
    model_type: str | None = None  # the transformers model_type the bundle was built from
    # The graph's architecture features (norms, QK-norm, rotary dim, windows per layer, scales):
    # jishi.families.Features as a dict; absent in bundles of the Llama layout written before.
    features: dict | None = None


@dataclass(frozen=True)
class GraphInfo:
    file: str
    data_file: str | None
    quantization: dict
    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    add_bos: bool
    bos_token: str | None
    eos_tokens: list[str]
    eos_token_ids: list[int]
    chat_template: str | None = None
    pad_token_id: int | None = None


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    config: ModelConfig
    graph: GraphInfo
    tokenizer: TokenizerInfo
    files: dict[str, FileEntry]
    merge_points: dict | None = None
    adapters: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # the model's own defaults (runtime/defaults.py)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        body = asdict(self)
        body = {"format": body.pop("format"), "format_version": body.pop("format_version"), **body}
        return (json.dumps(body, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"manifest.json is not valid JSON ({e}); the bundle is damaged: copy it again") from None
        if not isinstance(body, dict):
            raise BundleError("manifest.json does not hold a JSON object; the bundle is damaged: copy it again")
        fmt, version = body.get("format"), body.get("format_version")
        if fmt != FORMAT:
            raise BundleError(f"not a jishi bundle: manifest format is {fmt!r}, expected {FORMAT!r}")
        if version not in READS:
            raise BundleError(
                f"bundle format version {version!r} is not supported by this jishi (it reads versions "
                f"{', '.join(map(str, READS))}); upgrade jishi or rebuild the bundle with this version"
            )
        from jishi.runtime.manifest_schema import check_manifest_body

        check_manifest_body(body)
        try:
            return cls(
                name=_typed(body, "name", str),
                config=_build(ModelConfig, body.get("config")),
                graph=_build(GraphInfo, body.get("graph")),
                tokenizer=_build(TokenizerInfo, body.get("tokenizer")),
                files={k: _build(FileEntry, v) for k, v in _typed(body, "files", dict).items()},
                merge_points=body.get("merge_points"),
                adapters=list(body.get("adapters") or []),
                provenance=dict(body.get("provenance") or {}),
                evaluation=dict(body.get("evaluation") or {}),
                defaults=dict(body.get("defaults") or {}),
                format_version=version,  # kept: an old bundle stays old when its manifest is written again
            )
        except (TypeError, ValueError) as e:
            raise BundleError(f"manifest.json is malformed: {e}") from None


def _typed(body: dict, key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        raise ValueError(f"field {key!r} must be a {kind.__name__}, found {type(value).__name__}")
    return value


def _build(cls: type, body: Any):
    if not isinstance(body, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = required - body.keys()
    if missing:
        raise ValueError(f"{cls.__name__} lacks {', '.join(sorted(missing))}")
    return cls(**{k: v for k, v in body.items() if k in names})

