"""GGUF files jishi must refuse clearly, and what a base without a chat template needs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf_files import write_tiny_gguf  # noqa: E402

from jishi.errors import BaseModelError, JishiError  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gguf-in") / "tiny-licensed.gguf"
    write_tiny_gguf(path, tiny_tokenizer, license="Test-Licence-1.0")
    return path


def test_a_truncated_file_is_refused_with_its_name(tiny_gguf, tmp_path):
    from jishi.distill.base import load_base

    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(BaseModelError, match=rf"{cut.name} is not a readable GGUF file \(truncated.*fetch or convert it again"):
        load_base(str(cut))


def test_a_tensor_type_no_reader_knows_is_refused(tmp_path):
    from jishi.distill.base import load_base

    path = tmp_path / "q8k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 292), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BaseModelError, match=r"q8k\.gguf: tensor token_embd\.weight is of type Q8_K, which jishi "
                                             r"cannot read.*llama-quantize"):
        load_base(str(path))


def test_metadata_that_contradicts_the_weights_is_refused(tmp_path, tiny_tokenizer):
    from jishi.distill.base import load_base

    path = tmp_path / "wrong-kv.gguf"
    write_tiny_gguf(path, tiny_tokenizer, head_count_kv=1)
    with pytest.raises(BaseModelError, match=r"wrong-kv\.gguf: llama\.attention\.head_count_kv is 1 but "
                                             r"blk\.0\.attn_k\.weight has 128 rows \(heads of 64\)"):
        load_base(str(path))


@pytest.fixture(scope="module")
def bundle(tiny_gguf, tmp_path_factory):
    from jishi.pipeline import build

    return build(str(tiny_gguf), None, tmp_path_factory.mktemp("b") / "b", context=64, evaluate=False, quiet=True)


def test_the_licence_is_recorded_and_shown(bundle):
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.describe import describe

    b = open_bundle(bundle)
    assert b.manifest.provenance["base_license"] == "Test-Licence-1.0"
    text = describe(b)
    assert "licence             Test-Licence-1.0" in text
    assert "template            none: a pretrained base" in text


TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def test_a_base_without_a_template_generates_and_says_how_to_chat(bundle):
    import jishi

    m = jishi.load(bundle)
    assert m.manifest.tokenizer.chat_template is None
    assert m.generate("Hello", max_new_tokens=4, temperature=0).completion_tokens >= 1
    with pytest.raises(JishiError, match=r"no chat template.*--chat-template FILE"):
        m.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    given = jishi.load(bundle, chat_template=TEMPLATE)
    prompt = given.chat_prompt([{"role": "user", "content": "hi"}])
    assert given.tokenizer.encode(prompt, bos=False)[:1] == [given.tokenizer._tok.token_to_id("<|im_start|>")]
    assert given.chat([{"role": "user", "content": "hi"}], max_new_tokens=2, temperature=0).completion_tokens >= 1


def test_a_template_given_at_build_is_stored_and_a_broken_one_refused(tiny_gguf, tmp_path):
    from jishi.pipeline import build
    from jishi.runtime.bundle import open_bundle

    out = build(str(tiny_gguf), None, tmp_path / "t", context=64, evaluate=False, quiet=True, chat_template=TEMPLATE)
    m = open_bundle(out).manifest
    assert m.tokenizer.chat_template == TEMPLATE and m.provenance["chat_template"] == "given at build"
    with pytest.raises(JishiError, match="the chat template given does not parse"):
        build(str(tiny_gguf), None, tmp_path / "u", context=64, evaluate=False, quiet=True,
              chat_template="{% for m in messages %}")


def test_cli_builds_a_gguf_on_its_grids_and_info_shows_formats_and_licence(tiny_gguf, tmp_path):
    from tests.test_cli import jishi

    out = tmp_path / "cli-gguf"
    done = jishi("build", "--base", str(tiny_gguf), "--context", "64", "--no-eval", "-o", str(out))
    assert done.returncode == 0, done.stderr
    info = jishi("info", str(out))
    assert info.returncode == 0, info.stderr
    for expected in ("name=gguf", "tensor formats", "  self_attn.v_proj  Q6_K x1, Q5_K x1",
                     "  Q6_K" + " " * 14 + "kept as int8 block 16", "licence             Test-Licence-1.0",
                     "template            none: a pretrained base"):
        assert expected in info.stdout, expected
    chat = jishi("chat", str(out), input="hi\n")
    assert chat.returncode != 0 and "no chat template" in chat.stderr and "--chat-template FILE" in chat.stderr
    bad = jishi("build", "--base", str(tiny_gguf), "--quant", "gguf", "--head", "int4", "-o", str(tmp_path / "x"))
    assert bad.returncode != 0 and "--head int4 applies to int4 and int8 bundles (asked for gguf)" in bad.stderr
