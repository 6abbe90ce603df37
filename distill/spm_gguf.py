"""A GGUF's SentencePiece tokenizer, rebuilt as the SentencePiece model it came from.

GGUF files of SentencePiece models (``tokenizer.ggml.model == "llama"``: Gemma, Llama 1–2,
Mistral v1) carry each piece with its score and type. transformers' GGUF conversion reads
those scores as a Unigram model, which tokenizes some text differently from the original BPE
(measured on a SentencePiece BPE model with byte fallback: 5 of 29 multilingual lines; on the
real Gemma 3 270M file, with its leading-space handling, 23 of 29). Rebuilt
as a SentencePiece BPE model, the vocabulary converts with transformers' own converter for
SentencePiece files (merges by score, byte fallback) and matches sentencepiece itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from jishi.errors import BaseModelError

# GGUF token types (gguf.TokenType) → SentencePiece piece types (ModelProto.SentencePiece.Type)
_PIECE_TYPES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}  # normal, unknown, control, user-defined, unused, byte
_SPM_BPE = 2


def is_sentencepiece(reader) -> bool:
    return _string(reader, "tokenizer.ggml.model") == "llama"


def sentencepiece_model(reader) -> bytes:
    """The serialized SentencePiece ModelProto of a GGUF's SPM vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = reader.fields
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    scores = _array(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _array(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or len(scores) != len(tokens) or len(types) != len(tokens):
        raise BaseModelError("the GGUF's tokenizer lists tokens, scores and types of different lengths; the file is damaged")
    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=_piece(piece), score=float(score), type=_PIECE_TYPES.get(int(kind), 1))
    spec = proto.trainer_spec
    spec.model_type = _SPM_BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(int(t) == 6 for t in types)
    for name, key in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        value = _scalar(reader, f"tokenizer.ggml.{key}_token_id")
        setattr(spec, name, int(value) if value is not None else -1)
    add_prefix = _scalar(reader, "tokenizer.ggml.add_space_prefix")
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True if add_prefix is None else bool(add_prefix)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    del fields
    return proto.SerializeToString()


def _piece(token: str) -> str:
    """A GGUF token as its SentencePiece piece: llama.cpp writes runs of the whitespace mark "▁" as
    spaces in user-defined pieces (Gemma's "▁▁" is stored as "  "), which SentencePiece never matches
    (it escapes the text's spaces first)."""
    return "\u2581" * len(token) if token and not token.strip(" ") else token


CONVERSION = "spm-1"  # names this conversion in cached tokenizers: change it when the conversion changes


def fast_tokenizer(path: Path, workdir: Path, cached: Path | None = None):
    """A transformers fast tokenizer equal to the GGUF's SentencePiece model (None if it has none).

    Converting a large vocabulary takes a while (Gemma 3's 262,144 pieces: about a minute here);
    ``cached`` (a path named by the file's sha256) keeps the result for the next load."""
    from gguf import GGUFReader
    from transformers import GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    reader = GGUFReader(str(path))
    if not is_sentencepiece(reader):
        return None
    model = Path(workdir) / "tokenizer.model"
    model.write_bytes(sentencepiece_model(reader))
    tokens = _strings(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = _scalar(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    add_prefix = _scalar(reader, "tokenizer.ggml.add_space_prefix")
    add_prefix = True if add_prefix is None else bool(add_prefix)
    # Both slow tokenizers read the rebuilt model and convert it the same way (BPE merges by score,
    # byte fallback); they differ in the leading space SentencePiece adds.
    specials = dict(bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding"))
    if cached is not None and cached.is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(cached))
    else:
        if add_prefix:
            # legacy: the space is added before any text, as SentencePiece does (the newer scheme skips it
            # before text that starts with a space).
            slow = LlamaTokenizer(str(model), legacy=True, add_bos_token=False, **specials)
        else:
            slow = GemmaTokenizer(str(model), add_bos_token=False, **specials)
        backend = _raw_whitespace_pieces(convert_slow_tokenizer(slow))
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                part = cached.with_name(cached.name + f".{os.getpid()}.part")
                backend.save(str(part))
                os.replace(part, cached)
            except OSError:  # a read-only cache: convert again next time
                pass
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    template = _string(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def _raw_whitespace_pieces(tok):
    """User-defined pieces become tokenizers' added tokens, matched in the text before its spaces
    become "▁": a run of "▁" among them is matched after that (normalized), as SentencePiece does."""
    import json

    from tokenizers import Tokenizer

    body = json.loads(tok.to_str())
    for added in body.get("added_tokens", []):
        if added["content"] and not added["content"].strip("\u2581") and not added.get("special"):
            added["normalized"] = True
    return Tokenizer.from_str(json.dumps(body))


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None or not f.data else f


def _scalar(reader, key):
    f = _field(reader, key)
    return None if f is None else f.parts[f.data[0]][0]


def _string(reader, key) -> str | None:
    f = _field(reader, key)
    return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8")


def _strings(reader, key) -> list[str]:
    f = _field(reader, key)
    return [] if f is None else [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def _array(reader, key) -> list:
    f = _field(reader, key)
    return [] if f is None else [f.parts[i][0] for i in f.data]
