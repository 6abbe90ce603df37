"""jishi: a small language model, shrunk, exported to ONNX and run offline.

    import jishi
    m = jishi.load("bundles/smollm2-135m-instruct-gguf")
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}]))

Importing jishi loads neither torch nor onnxruntime; ``load`` brings in the runtime.
"""

from jishi.errors import (
    AdapterError,
    BaseModelError,
    BundleError,
    ContextLengthError,
    DeviceFitError,
    JishiError,
    MissingExtraError,
    SignatureError,
)

__version__ = "0.1.0"

__all__ = [
    "load",
    "AdapterError",
    "BaseModelError",
    "BundleError",
    "ContextLengthError",
    "DeviceFitError",
    "JishiError",
    "MissingExtraError",
    "SignatureError",
]


def load(bundle, threads: int | None = None, context: int | None = None, force: bool = False, adapters: bool = False,
         chat_template: str | None = None, draft=None, speculation: str | None = None):
    """Open a bundle (a directory path, or an installed model's name) for generation.

    ``threads`` defaults to the device profile's count (its performance cores, at most the physical
    cores this process may use), which also sets onnxruntime's provider and memory settings
    (``model.settings``); ``context`` defaults to the bundle's. A bundle that
    will not fit in the memory available now is refused (DeviceFitError) unless ``force``.
    ``adapters=True`` opens the graph with merge points at once (otherwise the first use of
    an adapter does, a one-time cost of a second or so for int8/fp16/fp32 bundles).
    ``chat_template`` (the Jinja text of a Hugging Face style template) replaces the bundle's own, or
    gives one to a bundle of a pretrained base that has none.

    Decoding guesses ahead and checks the guesses in one run (speculative decoding; the tokens are
    the ones plain decoding picks): ``speculation="lookup"`` (the default) guesses from n-grams of
    the text so far, ``draft`` (a bundle with the same tokenizer, e.g. a distilled student) makes
    ``"draft"`` the default, ``"off"`` decodes one token a run.
    """
    from jishi.runtime.model import load as _load

    return _load(bundle, threads=threads, context=context, force=force, adapters=adapters, chat_template=chat_template,
                 draft=draft, speculation=speculation)
