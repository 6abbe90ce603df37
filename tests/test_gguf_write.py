"""A torch Llama written to GGUF (distill/gguf_write.py): read back by jishi, transformers and llama.cpp as the
model that was written, and refused or left unwritten where it cannot be."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf_files import write_tiny_gguf  # noqa: E402

from jishi.errors import BaseModelError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PEERS = Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "python"  # bench/setup_peers.sh makes it


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    """A GGUF of the tiny tokenizer whose shape differs from the models' (256 wide, 2 blocks): only its
    tokenizer may reach the written file."""
    path = tmp_path_factory.mktemp("gguf-ref") / "reference.gguf"
    write_tiny_gguf(path, tiny_tokenizer)
    return path


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["tied-2", "untied-3"])
def model(request, tiny_dirs, tiny_tokenizer, tmp_path_factory):
    """The suite's tiny Llama (tied head, 2 blocks), and one with its own head and 3 blocks, as a student
    differs from its teacher's file in block count."""
    if request.param == "tied-2":
        return _hf(tiny_dirs["llama"])
    from conftest import make_tiny

    return _hf(make_tiny("llama", tmp_path_factory.mktemp("untied") / "llama", tiny_tokenizer, layers=3, seed=1,
                         tie_word_embeddings=False))


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    from jishi.heldout import heldout_text

    return tiny_tokenizer.encode(heldout_text()[:3000]).ids[:200]


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {"tensors": {t.name: t.tensor_type.name for t in reader.tensors},
            **{k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.") or k == "general.file_type"}}


def test_f32_reads_back_as_the_same_model(model, reference, ids, tmp_path):
    from jishi.distill.base import load_base
    from jishi.distill.gguf_write import write_gguf

    out = write_gguf(model, reference, tmp_path / "m.gguf")
    c = model.config
    f = _fields(out)
    assert f["llama.block_count"] == c.num_hidden_layers and f["llama.embedding_length"] == c.hidden_size
    assert f["llama.feed_forward_length"] == c.intermediate_size and f["llama.attention.head_count_kv"] == 2
    assert set(f["tensors"].values()) == {"F32"} and f["general.file_type"] == 0
    assert ("output.weight" in f["tensors"]) == (not c.tie_word_embeddings)
    want = _logits(model, ids)
    loaded = load_base(out)
    assert loaded.model.config.num_hidden_layers == c.num_hidden_layers
    ref = gguf.GGUFReader(reference)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
        assert gguf.GGUFReader(out).get_field(key).contents() == ref.get_field(key).contents()
    # The same float32 weights through the same arithmetic: equal up to the float32 rounding of rms_norm_eps
    # (GGUF stores it as float32).
    np.testing.assert_allclose(_logits(loaded.model, ids), want, rtol=0, atol=1e-5)
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, torch_dtype=torch.float32).eval()
    np.testing.assert_allclose(_logits(theirs, ids), want, rtol=0, atol=1e-5)


def test_f16_holds_the_weights_rounded_to_half_and_norms_in_f32(model, reference, ids, tmp_path):
    from jishi.distill.base import load_base
    from jishi.distill.gguf_write import write_gguf

    out = write_gguf(model, reference, tmp_path / "m16.gguf", dtype="f16")
    f = _fields(out)
    assert f["general.file_type"] == 1
    assert {k for k, t in f["tensors"].items() if t == "F32"} == {k for k in f["tensors"] if k.endswith("norm.weight")}
    loaded = dict(load_base(out).model.named_parameters())
    for name, p in model.named_parameters():
        w = p.detach()
        np.testing.assert_array_equal(loaded[name].detach().numpy(),
                                      (w.half().float() if w.dim() == 2 else w).numpy(), err_msg=name)
    # fp16 rounds each weight by at most 2^-11 of itself; through these models (logits up to ~3.3 in size) that
    # moved a logit by at most 2.7e-3 (tied) and 2.3e-3 (untied): bounded at 1e-2, 0.3% of the largest logit.
    got, want = _logits(load_base(out).model, ids), _logits(model, ids)
    assert np.abs(got - want).max() < 1e-2


def test_a_model_of_another_architecture_is_refused_and_nothing_written(tiny_dirs, reference, tmp_path):
    from jishi.distill.gguf_write import write_gguf

    with pytest.raises(BaseModelError, match="cannot write a Qwen2ForCausalLM to GGUF: only LlamaForCausalLM is supported"):
        write_gguf(_hf(tiny_dirs["qwen2"]), reference, tmp_path / "q.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_reference_of_another_vocabulary_is_refused(reference, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from jishi.distill.gguf_write import write_gguf

    other = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(BaseModelError, match="a llama file with 384 tokens, the model a llama of 500"):
        write_gguf(other, reference, tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_leaves_no_partial_file_and_the_old_one_as_it_was(tiny_dirs, reference, tmp_path,
                                                                             monkeypatch):
    from jishi.distill.gguf_write import write_gguf

    model = _hf(tiny_dirs["llama"])
    out = write_gguf(model, reference, tmp_path / "m.gguf")
    before = out.read_bytes()

    def full(self, **kw):
        self.fout[0].write(b"\0" * 1000)  # some of the tensors' bytes, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(OSError, match="No space left"):
        write_gguf(model, reference, out, dtype="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"] and out.read_bytes() == before
    with pytest.raises(OSError, match="No space left"):
        write_gguf(model, reference, tmp_path / "new.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


LLAMA_CPP_LOGITS = """
import sys, numpy as np, llama_cpp
path, ids_file, out = sys.argv[1:]
ids = np.load(ids_file).tolist()
llm = llama_cpp.Llama(path, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True, n_threads=1,
                      n_threads_batch=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
llm.eval(ids)
np.save(out, np.array(llm.scores[:len(ids)]))
"""


def _has_llama_cpp() -> bool:
    return PEERS.is_file() and subprocess.run([str(PEERS), "-c", "import llama_cpp"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed (bash bench/setup_peers.sh)")
def test_llama_cpp_computes_the_same_logits(model, reference, ids, tmp_path):
    """llama.cpp itself: its own names, metadata and rotary order (q/k rows interleaved per head). A wrong
    order changes every logit; float32 kernels and cache leave ~1e-5."""
    from jishi.distill.gguf_write import write_gguf

    out = write_gguf(model, reference, tmp_path / "m.gguf")
    np.save(tmp_path / "ids.npy", np.array(ids, np.int32))
    done = subprocess.run([str(PEERS), "-c", LLAMA_CPP_LOGITS, str(out), str(tmp_path / "ids.npy"),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), _logits(model, ids), rtol=0, atol=1e-4)
