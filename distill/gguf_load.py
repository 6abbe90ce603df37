"""A GGUF base loaded into torch one tensor at a time.

transformers' own GGUF loading dequantizes every tensor into a dictionary and then copies it into
the model: about twice the float32 weights at once (measured 2x on Gemma 3 270M), which puts a
4B model out of reach of a 24 GiB machine. Here the model is created empty from the config
transformers reads from the file, and each tensor is dequantized (``gguf``), passed through
transformers' own tensor processor for the architecture (Llama's q/k row order, Gemma's norms)
and copied into its parameter, then freed: the float32 weights plus one tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jishi.errors import BaseModelError


def load_gguf_model(path: Path, config):
    """The model of the GGUF at ``path`` in float32, eval mode, with transformers' names and layout."""
    import torch
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint)
    from transformers.modeling_utils import no_init_weights
    from tqdm import tqdm

    from jishi.distill.gguf_tensors import _meta, open_reader

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.eval()
    mapping = get_gguf_hf_weights_map(model)
    reader = open_reader(path)
    processor = TENSOR_PROCESSORS.get(_meta(reader, "general.architecture"), TensorProcessor)(config=parsed["config"])
    params = dict(model.named_parameters())
    filled: set[str] = set()
    with torch.no_grad():
        for t in tqdm(reader.tensors, desc="Loading the GGUF's tensors", unit="tensor", leave=False,
                      disable=None):
            out = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                    tensor_key_mapping=mapping, parsed_parameters=parsed)
            name = mapping.get(out.name)
            if name is None or name not in params:
                continue
            target = params[name]
            w = np.ascontiguousarray(out.weights, dtype=np.float32)
            w = torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are views of the read-only file
            if w.numel() != target.numel():
                raise BaseModelError(f"{path}: tensor {t.name} has {w.numel()} values but the model's {name} "
                                     f"takes {target.numel()}; the file's metadata contradicts its weights")
            target.copy_(w.reshape(target.shape))
            filled.add(name)
    model.tie_weights()
    shared = {id(p) for n, p in params.items() if n in filled}
    missing = [n for n, p in model.named_parameters() if n not in filled and id(p) not in shared]
    if missing:
        raise BaseModelError(f"{path} has no weights for {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                             "the file is incomplete or of a layout jishi does not read")
    return model
