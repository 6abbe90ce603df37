"""The pre-tokenizer of a GGUF's byte-level BPE vocabulary, by its ``tokenizer.ggml.pre`` name.

transformers reads every byte-level BPE GGUF (``tokenizer.ggml.model == "gpt2"``) with GPT-2's
split (all digits in one piece, case-sensitive contractions) and applies every merge. Llama 3
splits numbers into groups of at most three digits, matches contractions in any case and takes
a piece that is itself in the vocabulary whole (``ignore_merges``) and decodes byte for byte: its GGUFs (pre-tokenizer
``llama-bpe``) get Llama 3's tokenizer here. Other names keep what transformers gives.
"""

from __future__ import annotations

# Llama 3's split, as its tokenizer.json writes it.
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
SPLITS = {"llama-bpe": LLAMA3, "llama3": LLAMA3}


def with_pre_tokenizer(fast, pre: str | None):
    """``fast`` (a transformers fast tokenizer read from a GGUF) with the split its ``pre`` name says."""
    pattern = SPLITS.get(pre or "")
    if pattern is None:
        return fast
    from tokenizers import Regex, decoders, pre_tokenizers

    backend = fast.backend_tokenizer
    backend.model.ignore_merges = True
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()  # transformers' GGUF decoder strips a leading space Llama 3 keeps
    return fast
