"""The Python API of a loaded bundle: generate, stream, chat and score."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from jishi.errors import AdapterError, BundleError, ContextLengthError, DeviceFitError, JishiError
from jishi.runtime.bundle import Bundle, open_bundle
from jishi.runtime.engine import Engine, make_session
from jishi.runtime.generation import Generation, normalize_stops
from jishi.runtime.sampling import SamplingParams
from jishi.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class Result:
    """What ``generate`` and ``chat`` return; ``str(result)`` is the text."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple | None = None  # generation.TokenLogprob per token, when asked for
    speculation: dict | None = None  # speculative.SpeculationStats.as_dict(), when it ran

    def __str__(self) -> str:
        return self.text


SCORE_CHUNK = 128  # tokens whose logits score() holds at once
POOLING = {"mean": lambda h: h.mean(axis=0), "last": lambda h: h[-1]}
EMBED_BATCH_TOKENS = 1024  # padded tokens per embedding run: bounds its scratch and cache


def embed_batches(encoded: list[list[int]]) -> list[list[int]]:
    """Indices of the texts grouped for one run each: similar lengths together (little padding),
    at most EMBED_BATCH_TOKENS padded tokens a group; a longer text alone."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * len(encoded[i]) <= EMBED_BATCH_TOKENS:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Stream:
    """Text pieces as they are generated; ``.result`` once the iteration is over."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as stop:
            if stop.value is not None:
                self.result = stop.value
            raise

    def close(self) -> None:
        """Stop generating (e.g. the user pressed Ctrl-C); the cache stays consistent."""
        self._pieces.close()


def resolve_bundle(name_or_path: str | os.PathLike) -> Path:
    """A path if it exists as one, else the directory of an installed model of that name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    from jishi.runtime.store import installed_path

    found = installed_path(str(name_or_path))
    if found is None:
        raise BundleError(
            f"no bundle {str(name_or_path)!r}: it is neither a path that exists nor an installed model "
            "(see `jishi list`; build one with `jishi build`)"
        )
    return found


def check_fits(bundle: Bundle, context: int) -> None:
    """Refuse a bundle that will not fit in the memory this machine has available now."""
    from jishi.devices.detect import detect
    from jishi.devices.plan import RUNTIME_OVERHEAD

    c = bundle.manifest.config
    weights = bundle.size * (2 if bundle.manifest.graph.quantization.get("name") == "fp16" else 1)  # fp16 runs as fp32
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * 4
    needed = weights + kv + RUNTIME_OVERHEAD
    available = detect().available_bytes
    if available and needed > available:
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
        room = (available - weights - RUNTIME_OVERHEAD) // per_token
        hint = (f"a context of about {room} tokens would fit (load with context=...)" if room >= 256
                else "a smaller quantization (jishi build --quant int4) or a smaller model would")
        raise DeviceFitError(
            f"{bundle.manifest.name} needs about {needed / 2**20:.0f} MB at context {context} but only "
            f"{available / 2**20:.0f} MB are available; {hint}, or pass force=True (--force) to try anyway"
        )


class Model:
    def __init__(self, bundle: Bundle, threads: int | None = None, context: int | None = None, force: bool = False,
                 adapters: bool = False, chat_template: str | None = None, draft=None,
                 speculation: str | None = None):
        """``adapters=True`` opens the graph with merge points straight away (a server that will
        switch adapters); otherwise it is opened the first time an adapter is used. ``chat_template``
        (Jinja text) replaces the bundle's own, or gives one to a bundle that has none.

        ``speculation`` is how decoding guesses ahead (runtime.speculative): ``"lookup"`` (the
        default: n-grams of the text so far), ``"draft"`` (the default when ``draft`` is given: a
        smaller bundle with the same tokenizer, a path, name or loaded Model) or ``"off"``."""
        m = bundle.manifest
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template.strip():
                raise BundleError("chat_template must be the template's text (a non-empty string)")
            m = replace(m, tokenizer=replace(m.tokenizer, chat_template=chat_template))
        self.bundle = bundle
        self.manifest = m
        self.name = m.name
        built = m.config.context_length
        if context is not None and not 1 <= context <= built:
            raise ContextLengthError(f"context {context} must be between 1 and the bundle's {built} tokens")
        self.context = context or built
        if not force:
            check_fits(bundle, self.context)
        from jishi.runtime.settings import for_this_machine

        self.settings = for_this_machine(threads)  # from the device profile; ``threads`` overrides its count
        self.threads = self.settings.threads
        self.tokenizer = Tokenizer(bundle.path(m.tokenizer.file), m.tokenizer)
        from jishi.runtime import defaults

        self.defaults = defaults.of(m)  # the model's own sampling values, system prompt, stops
        mp = m.merge_points or {}
        # A bundle may hold its graph twice over one weights file: with merge points (opened
        # when an adapter is first used) and without (faster, for requests with no adapter).
        self._adapter_graph = mp.get("graph")
        self.engine = self._open(self._adapter_graph if adapters and self._adapter_graph else m.graph.file)
        self._adapters: dict = {}  # loaded adapters by name
        self._defaults: dict | None = None  # the merge points' default tensors, read once
        self._workspace: dict = {}  # the active adapter's merge-point inputs
        self.active_adapter: str | None = None
        from jishi.runtime.speculative import Speculation

        if draft is not None and not isinstance(draft, Model):
            draft = load(draft, threads=threads, force=force)
        self.speculation = Speculation(speculation or ("draft" if draft is not None else "lookup"), draft)
        if draft is not None:
            Speculation.check_draft(draft, self)

    def _open(self, graph_file: str) -> Engine:
        m = self.manifest
        try:
            session = make_session(self.bundle.path(graph_file), self.settings)
        except Exception as e:  # onnxruntime reports a bad graph with its own exception types
            raise BundleError(f"onnxruntime cannot load {graph_file}: {e}") from None
        if self.settings.release_mapped_weights:
            from jishi.runtime.memory import release_mapped_file

            release_mapped_file(self.bundle.path(m.graph.data_file))  # pages read once by prepacking (runtime/memory.py)
        self.graph_file = graph_file
        base_inputs = None
        if self.has_merge_points:
            from jishi.runtime.adapters import default_a_inputs

            base_inputs = default_a_inputs(m.config, m.merge_points, self._b_rows(graph_file))
        return Engine(session, m.config, self.context, base_inputs)

    def _b_rows(self, graph_file: str) -> dict[str, int]:
        """Rows of each merge point's stored B default (1: no correction there, its A default is a zero column)."""
        from jishi.runtime.graph_shapes import graph_shapes

        _, _, inits = graph_shapes(self.bundle.path(graph_file).read_bytes())
        return {n: d[0] for n, d in inits.items() if n.startswith("lora.") and n.endswith(".b") and d}

    @property
    def has_merge_points(self) -> bool:
        """Whether the open graph takes adapters (else the first adapter opens the one that does)."""
        return bool(self.manifest.merge_points) and self.graph_file == (self._adapter_graph or self.manifest.graph.file)

    # --- adapters ---------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return [a["name"] for a in self.manifest.adapters]

    def load_adapter(self, name: str):
        """Load (once) an adapter of the bundle; several stay loaded."""
        if name not in self._adapters:
            from jishi.runtime.adapters import build_adapter, read_adapter_file
            from jishi.runtime.bundle import float_initializers

            entry = next((a for a in self.manifest.adapters if a["name"] == name), None)
            if entry is None:
                raise AdapterError(f"this bundle has no adapter {name!r}; it has: {', '.join(self.adapters) or 'none'}")
            mp = self.manifest.merge_points or {}
            if self._defaults is None:
                from jishi.runtime.adapters import default_a_inputs

                self._defaults = {**default_a_inputs(self.manifest.config, mp, self._b_rows(mp.get("graph") or self.manifest.graph.file)),
                                  **float_initializers(self.bundle, "lora.", mp.get("graph"))}
            params = read_adapter_file(self.bundle.path(entry["file"]))
            self._adapters[name] = build_adapter(name, params, self.manifest.config, tuple(mp.get("targets", ())))
        return self._adapters[name]

    def open_adapter_graph(self) -> None:
        """Switch to the graph with merge points (if not on it already), for adapters to be bound.

        One session at a time, so memory holds one copy of the weights: the plain graph goes,
        and requests with no adapter then run on this one with its zero inputs.
        """
        if not self.has_merge_points and self._adapter_graph:
            self.engine = None
            self.engine = self._open(self._adapter_graph)
            self.active_adapter = None

    def adapter_inputs(self, name: str | None) -> dict:
        """The merge-point inputs that activate ``name`` (built now: a loaded adapter keeps only its tensors)."""
        if name is None:
            return {}
        from jishi.runtime.adapters import fused_inputs

        return fused_inputs(self.load_adapter(name), self.manifest.config, self._defaults)

    def use_adapter(self, name: str | None) -> None:
        """Make ``name`` (or no adapter) active for the following requests."""
        if name == self.active_adapter:
            return
        if name:
            from jishi.runtime.adapters import fused_inputs

            adapter = self.load_adapter(name)
            self.open_adapter_graph()
            # One workspace for the active adapter's inputs, written over at each switch.
            self._workspace = fused_inputs(adapter, self.manifest.config, self._defaults, reuse=self._workspace)
            self.engine.set_inputs(self._workspace)
        else:
            self.engine.set_inputs({})
        self.active_adapter = name

    # --- text in, text out -------------------------------------------------------------

    def generate(self, prompt: str, **kwargs) -> Result:
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: str | Iterable[str] | None = None,
        seed: int | None = None,
        truncate: bool = False,
        chat: bool = False,
        adapter: str | None = None,
        min_p: float | None = None,
        logit_bias: dict[int, float] | None = None,
        schema=None,
        regex: str | None = None,
        grammar: str | None = None,
        json_object: bool = False,
        logprobs: int | None = None,
        speculation: str | None = None,
    ) -> Stream:
        """Text pieces as they are generated. ``chat=True`` marks a prompt rendered by the chat
        template, which writes its own special tokens (no BOS is added to it, as in transformers).

        At most one constraint: ``schema`` (a JSON schema dict or text, or a Pydantic model
        class), ``regex``, ``grammar`` (Lark) or ``json_object=True`` (any JSON object).
        ``logprobs=k`` records each token's log-probability and its k (0..20) most likely
        alternatives in ``Result.logprobs``. Temperature 0 is plain greedy: the repetition
        penalty, top-k, top-p and min-p apply only when sampling. A value left None is the
        model's default (``self.defaults``: jishi's own unless the bundle sets others), and so
        are the stops and the answer length (256 tokens unless the bundle says). ``speculation``
        ("lookup", "draft", "off") overrides the model's for this answer; it changes the speed,
        not the tokens (``Result.speculation`` says what it did)."""
        try:
            bias = tuple((int(t), float(b)) for t, b in (logit_bias or {}).items())
            params = replace(self.defaults.sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                                                    repetition_penalty=repetition_penalty, min_p=min_p),
                             logit_bias=bias)
            params.check_vocab(self.manifest.config.vocab_size)
        except (ValueError, TypeError) as e:
            raise JishiError(str(e)) from None
        if max_new_tokens is None:
            max_new_tokens = self.defaults.max_tokens or 256
        if stop is None:
            stop = self.defaults.stop
        if max_new_tokens < 1:
            raise JishiError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        from jishi.runtime.generation import MAX_TOP_LOGPROBS, make_rng

        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise JishiError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {logprobs!r}")
        try:
            make_rng(seed)
        except ValueError as e:
            raise JishiError(str(e)) from None
        constraint = pick_constraint(schema, regex, grammar, json_object)
        matcher = self.matcher(constraint) if constraint is not None else None
        ids = self.tokenizer.encode(prompt, bos=False if chat else None)
        if not ids:
            raise JishiError("the prompt is empty")
        ids = self._fit_prompt(ids, max_new_tokens, truncate)
        self.use_adapter(adapter)
        from jishi.runtime.speculative import Speculation

        if speculation is not None and speculation not in Speculation.KINDS:
            raise JishiError(f"unknown speculation {speculation!r}; choose one of {', '.join(Speculation.KINDS)}")
        if speculation == "draft" and self.speculation.draft_model is None:
            raise JishiError("speculation 'draft' needs a draft model: load(..., draft=BUNDLE) or --draft BUNDLE")
        return Stream(self._generate(ids, max_new_tokens, params, normalize_stops(stop), seed, matcher, logprobs,
                                     speculation))

    def chat(self, messages: list[dict], template_vars: dict | None = None, **kwargs) -> Result:
        """``template_vars`` go to the chat template as they are, e.g. ``{"enable_thinking": False}`` (Qwen3)."""
        return self.generate(self.chat_prompt(messages, template_vars), chat=True, **kwargs)

    def chat_stream(self, messages: list[dict], template_vars: dict | None = None, **kwargs) -> Stream:
        return self.stream(self.chat_prompt(messages, template_vars), chat=True, **kwargs)

    def chat_prompt(self, messages: list[dict], template_vars: dict | None = None, tools: list[dict] | None = None) -> str:
        """The prompt for these messages; the model's default system prompt first when they bring none.

        ``template_vars`` go to the chat template as they are (e.g. Qwen3's ``enable_thinking``)."""
        system = self.defaults.system_prompt
        if system and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + list(messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **(template_vars or {}))

    def matcher(self, constraint):
        """A fresh matcher for a ``constraints.Constraint`` (compiled once per constraint and kept)."""
        from jishi.runtime.constraints import compiler_for

        return compiler_for(self.tokenizer, self.manifest.config.vocab_size).matcher(constraint)

    def count_tokens(self, text: str, chat: bool = False) -> int:
        return len(self.tokenizer.encode(text, bos=False if chat else None))

    def score(self, text: str | list[int], adapter: str | None = None) -> np.ndarray:
        """log p(token_i | tokens before it) for tokens 2..n of ``text`` (float64, n − 1 values).
        ``text`` may also be a list of token ids (e.g. a prompt's and the tokens generated after it)."""
        if isinstance(text, str):
            ids = self.tokenizer.encode(text)
        else:
            ids = [int(i) for i in text]
            if any(not 0 <= i < self.manifest.config.vocab_size for i in ids):
                raise JishiError(f"token ids must be in 0..{self.manifest.config.vocab_size - 1}")
        if len(ids) < 2:
            raise JishiError("score() needs a text of at least two tokens")
        if len(ids) > self.context:
            raise ContextLengthError(
                f"the text is {len(ids)} tokens, longer than the context of {self.context}; score it in pieces"
            )
        self.use_adapter(adapter)
        self.engine.reset()
        out = []
        for start in range(0, len(ids) - 1, SCORE_CHUNK):  # bounded memory: chunk × vocab at a time
            chunk = ids[start:min(start + SCORE_CHUNK, len(ids) - 1)]
            logits = self.engine.feed(chunk, all_logits=True).astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logz = np.log(np.exp(logits).sum(axis=-1))
            out.append(logits[np.arange(len(chunk)), ids[start + 1:start + 1 + len(chunk)]] - logz)
        return np.concatenate(out)

    # --- embeddings ------------------------------------------------------------------

    @property
    def has_embeddings(self) -> bool:
        g = self.manifest.graph
        return self.manifest.format_version >= 2 and "hidden_states" in g.outputs

    def embed(self, texts: str | list[str], pooling: str = "mean", normalize: bool = True,
              adapter: str | None = None, truncate: bool = False) -> np.ndarray:
        """One vector per text (n × hidden, float32): the final-norm hidden states of its tokens,
        averaged (``pooling="mean"``) or the last token's (``"last"``), scaled to length 1
        unless ``normalize=False``. A text longer than the context is an error, or with
        ``truncate`` keeps its start."""
        if not self.has_embeddings:
            raise BundleError(f"the bundle {self.name} was built before jishi's graphs returned hidden states "
                              f"(format version {self.manifest.format_version}); rebuild it with `jishi build` "
                              "for embeddings")
        if pooling not in POOLING:
            raise JishiError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise JishiError("embed() needs one or more non-empty texts")
        self.use_adapter(adapter)
        out = np.empty((len(texts), self.manifest.config.hidden_size), np.float32)
        encoded = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text)
            if len(ids) > self.context:
                if not truncate:
                    raise ContextLengthError(f"text {i} is {len(ids)} tokens, longer than the context of "
                                             f"{self.context}; shorten it or pass truncate=True")
                ids = ids[:self.context]
            encoded.append(ids)
        for group in embed_batches(encoded):
            if len(group) == 1 and len(encoded[group[0]]) > EMBED_BATCH_TOKENS:  # long: in chunks, on the cache
                out[group[0]] = POOLING[pooling](self.engine.hidden_states(encoded[group[0]]))
                self.engine.reset()
                continue
            for i, h in zip(group, self.engine.hidden_states_batch([encoded[i] for i in group])):
                out[i] = POOLING[pooling](h)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if single else out

    # --- the loop --------------------------------------------------------------------

    def _fit_prompt(self, ids: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
        """The prompt if it fits; with ``truncate``, its end (and BOS), leaving room for the answer."""
        if not truncate:
            if len(ids) >= self.context:
                raise ContextLengthError(
                    f"the prompt is {len(ids)} tokens and the context window is {self.context}; shorten the "
                    "prompt, load with a larger context, or pass truncate=True to keep its end"
                )
            return ids
        keep = max(1, self.context - min(max_new_tokens, self.context // 2))
        if len(ids) <= keep:
            return ids
        head = ids[:1] if self.tokenizer.bos_id is not None and ids[0] == self.tokenizer.bos_id else []
        return head + ids[len(ids) - keep + len(head):]

    def _generate(self, ids, max_new_tokens, params, stops, seed, matcher=None, logprobs=None, speculation=None):
        """The decode loop. With a drafter (runtime.speculative) a round checks its guesses in one
        run: the Generation picks from each row exactly as it would step by step, and the cache is
        cut back to the tokens kept before any text is yielded, so closing the stream between
        pieces leaves it consistent."""
        from jishi.runtime.speculative import Speculator

        gen = Generation(self.tokenizer, ids, min(max_new_tokens, self.context - len(ids)), params, stops, seed,
                         self.manifest.config.vocab_size, matcher=matcher, logprobs=logprobs)
        engine = self.engine
        spec = self.speculation.but(speculation)
        speculator = Speculator(spec, ids) if spec.kind != "off" else None
        logits = engine.feed(ids[engine.reuse_prefix(ids):])
        pieces = [gen.push(logits)]
        while True:
            yield from (p for p in pieces if p)
            if gen.done:
                return Result(gen.text, gen.finish_reason, len(ids), gen.completion_tokens,
                              tuple(gen.logprobs) if logprobs is not None else None,
                              speculator.stats.as_dict() if speculator is not None else None)
            if speculator is not None:
                pieces = speculator.round(gen, engine, self.context)
            else:
                pieces = [gen.push(engine.step(gen.token))]


def pick_constraint(schema=None, regex=None, grammar=None, json_object=False):
    """The one constraint these arguments ask for (a constraints.Constraint), or None."""
    from jishi.runtime import constraints

    given = [(name, v) for name, v in (("schema", schema), ("regex", regex), ("grammar", grammar),
                                       ("json_object", json_object or None)) if v is not None]
    if len(given) > 1:
        raise JishiError(f"give at most one constraint; got {', '.join(n for n, _ in given)}")
    if not given:
        return None
    name, value = given[0]
    if isinstance(value, constraints.Constraint):
        return value
    return {"schema": constraints.json_schema, "regex": constraints.regex, "grammar": constraints.lark,
            "json_object": lambda _: constraints.any_json()}[name](value)


def load(bundle, threads: int | None = None, context: int | None = None, force: bool = False,
         adapters: bool = False, chat_template: str | None = None, draft=None, speculation: str | None = None) -> Model:
    return Model(open_bundle(resolve_bundle(bundle)), threads=threads, context=context, force=force, adapters=adapters,
                 chat_template=chat_template, draft=draft, speculation=speculation)
