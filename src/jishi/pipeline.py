"""build = load the base → write the ONNX graph → write the bundle → measure its quality."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from jishi.errors import JishiError
from jishi.heldout import WINDOW, heldout_text, windows

DEFAULT_CONTEXT = 2048
# int4 of jishi's own methods: "exact" block minima (a correction side path per projection) or "integer" zero
# points (MatMulNBits' own form). Integer, from bench/quant_methods.py: as good or better on every method and
# model measured (the 20-block student: GPTQ +6.9% over fp32 against +32% exact, round-to-nearest +23% against
# +221%; the rotated teacher: GPTQ +7.5% against +7.7%), and without the side path (20% of a token's time in
# bench/token_profile.py). A GGUF's own grids keep their exact form: there it is no choice but the file's.
ZERO_POINTS = "integer"


def default_output(name: str, quant: str) -> Path:
    return Path("bundles") / f"{name}-{quant}"


def build(
    base=None,
    quant: str | None = None,
    output: str | Path | None = None,
    name: str | None = None,
    context: int | None = None,
    evaluate: bool = True,
    quiet: bool = False,
    merge_points: bool | None = None,
    accuracy_level: int = 4,
    merge: tuple[str, str | Path] | None = None,
    calibrated: bool = False,
    block: int = 32,
    calibration_sequences: int = 16,
    teacher=None,
    method: str | None = None,
    damp: float | None = None,
    act_order: bool | None = None,
    calibration: str | None = None,
    head_bits: int = 8,
    chat_template: str | None = None,
    check_memory: bool = True,
    zero_points: str | None = None,
    recover_steps: int = 0,
    recover_rank: int = 16,
    recover_output: str | Path | None = None,
) -> Path:
    """Build a bundle from a base model; returns its directory.

    ``base`` is a known name, a GGUF file, a Hugging Face directory, or a base
    already loaded with ``jishi.distill.base.load_base`` (to build several
    bundles from one load). ``context`` defaults to min(2048, the model's positions). ``quant`` defaults to
    ``gguf`` for a GGUF base (every tensor kept on its own grid, 4- or 8-bit, see ``jishi.export.gguf_formats``)
    and to ``int4`` otherwise. ``method`` (int4 only) is how the int4 codes are found: ``rtn``
    (round to nearest), ``gptq`` (GPTQ on calibration text, in input order unless
    ``act_order=True``; ``damp`` its damping), ``awq`` (activation-aware scales folded into the
    norms, then rounding) or ``awq-gptq``; None picks by where the weights come from
    (``default_method``): a GGUF base keeps its own 4-bit grid, a QAT student its trained grid,
    any other weights (a student, a Hugging Face directory, a merged adapter) get ``gptq``.
    ``calibrated=True`` is ``method="gptq"``. Calibration runs on ``calibration`` (text; default
    the part of pydoc_data.topics after the held-out text), ``calibration_sequences`` sequences of
    min(256, context) tokens; a text that shares a passage with the held-out text is refused.
    ``zero_points`` (int4 by jishi's own methods): ``exact`` puts each block's grid on its weights' minimum
    and maximum, which MatMulNBits reaches only through a correction side path (two more nodes per
    projection); ``integer`` keeps 0 on the grid and the zero point a code, MatMulNBits' own form;
    None is ZERO_POINTS, or ``exact`` for a QAT student (the grid it was trained on). A GGUF's own grids are
    kept as they are whatever this says.
    ``block`` is the int4/int8 block size; ``head_bits`` (8 or 4) the
    embedding table's and LM head's. ``chat_template`` (Jinja text) is stored in the bundle in place of the
    base's own (a pretrained base such as Gemma 3 270M has none). ``check_memory`` refuses, before
    loading anything, a build that needs more memory than this machine has available (DeviceFitError). ``merge=(NAME, ADAPTER_DIR)`` folds that LoRA adapter into
    the weights before quantization: a bundle for one task, with no merge points; its
    evaluation compares int4 and int8 of the merged weights and recommends one.

    ``recover_steps`` (int4 by rtn or gptq, with merge points): a LoRA of rank ``recover_rank`` is trained for that many
    steps against these very int4 codes, to follow the float model on the calibration text
    (``jishi.grid_recovery``); it is saved as a PEFT adapter (``recover_output``, default OUTPUT.recover) and added
    to the bundle as ``recover``, whose evaluation then has a ``recovered`` entry: the figures with it active.

    A student (a directory written by ``jishi distill``) is also measured against its
    teacher: ``teacher`` (a known name, path or loaded base), else the one its record names
    when it can be found here.
    """
    from tqdm import tqdm

    from jishi.distill.base import LoadedBase, load_base
    from jishi.export.bundle_writer import check_target, publish, staging_dir, with_files, write_manifest
    from jishi.export.from_torch import model_config, numpy_weights, rope_tables
    from jishi.export.graph import (QUANTS, QuantRecipe, build_decoder, constant_side_paths, save_model,
                                    strip_merge_points)
    from jishi.runtime.adapters import TARGETS
    from jishi.runtime.manifest import GraphInfo, Manifest
    from jishi.runtime.tokenizer import compact_merges

    from jishi.export.calibrate import CALIBRATED, METHODS

    if quant is not None and quant not in QUANTS:
        raise JishiError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if calibrated and quant not in ("int4", None):
        raise JishiError(f"--calibrated applies to int4 only (asked for {quant})")
    if calibrated:
        if method not in (None, "gptq"):
            raise JishiError(f"--calibrated means --method gptq, and --method {method} was asked for: give one of them")
        method = "gptq"
    if method is not None and method not in METHODS:
        raise JishiError(f"unknown int4 method {method!r}; choose one of {', '.join(METHODS)}")
    if method is not None and quant not in ("int4", None):
        raise JishiError(f"--method {method} applies to int4 only (asked for {quant})")
    from jishi.export.gptq import ACT_ORDER, DAMP

    if zero_points is not None and zero_points not in ("exact", "integer"):
        raise JishiError(f"zero points are 'exact' or 'integer', not {zero_points!r}")
    damp = DAMP if damp is None else damp
    act_order = ACT_ORDER if act_order is None else act_order
    if not 0 < damp < 1:
        raise JishiError(f"the GPTQ damping is a fraction of the Hessian's mean diagonal, above 0 and below 1 (not {damp})")
    if calibration is not None and not isinstance(calibration, str):
        raise JishiError("the calibration text must be text (str)")
    if head_bits not in (4, 8):
        raise JishiError(f"the embedding / LM head is stored at 8 or 4 bits, not {head_bits}")
    if head_bits != 8 and quant not in ("int4", "int8", None):
        raise JishiError(f"--head int{head_bits} applies to int4 and int8 bundles (asked for {quant})")
    if block not in (16, 32, 64, 128):
        raise JishiError(f"block size {block} is not supported; choose 16, 32, 64 or 128")
    if context is not None and context < 16:
        raise JishiError(f"context {context} is too small; use at least 16 tokens")
    if recover_steps < 0 or recover_rank < 1:
        raise JishiError("--recover-steps must be 0 or more and --recover-rank at least 1")
    if recover_steps and (merge is not None or merge_points is False):
        raise JishiError("--recover-steps adds a LoRA at the merge points: drop --merge / --no-merge-points")
    if recover_steps and quant not in ("int4", None):
        raise JishiError(f"--recover-steps trains against int4 codes, and this build is {quant}: use --quant int4")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))

    t0 = time.time()
    owned = not isinstance(base, LoadedBase)  # loaded here: its torch model may be let go once measured
    if isinstance(base, LoadedBase):
        base_model = base
    else:
        if check_memory:
            check_build_memory(base, quant, evaluate, calibrated=method in CALIBRATED or (
                method is None and quant in (None, "int4")))
        say("Loading the base model…")
        base_model = load_base(base)
    merged = None
    if merge is not None:
        if merge_points:
            raise JishiError("a merged bundle has no merge points: drop --merge-points and the other --adapter options")
        merge_points = False
        say(f"Merging adapter {merge[0]} into the weights…")
        base_model, merged = merged_base(base_model, *merge)
    from_gguf_file = Path(base_model.source).suffix.lower() == ".gguf" and Path(base_model.source).is_file()
    if quant is None:
        quant = "gguf" if from_gguf_file and merged is None and method is None and head_bits == 8 else "int4"
    if zero_points is not None and quant != "int4":
        raise JishiError(f"--zero-points applies to int4 bundles (this one is {quant}"
                         + ("; a GGUF base keeps its own grids unless built with --quant int4)" if quant == "gguf" else ")"))
    asked_zero_points = zero_points
    zero_points = ZERO_POINTS if zero_points is None else zero_points
    if quant == "gguf" and not from_gguf_file:
        raise JishiError(f"--quant gguf keeps a GGUF file's own grids, and {base_model.source} is not a GGUF file; "
                         "use --quant int4 (or int8, fp16, fp32)")
    if quant == "gguf" and merged is not None:
        raise JishiError("a merged adapter moves the weights off the GGUF's grids: build it with --quant int4 or int8")
    if evaluate:
        _check_teacher_tokenizer(base_model, teacher)
    tokenizer_info = base_model.tokenizer_info()
    if chat_template is not None:
        tokenizer_info = _with_template(base_model, tokenizer_info, chat_template)
    cfg = model_config(base_model.model.config, context)  # default: min(2048, the model's positions)
    context = cfg.context_length
    if quant in ("int4", "int8"):
        for what, size in (("hidden size", cfg.hidden_size), ("MLP size", cfg.intermediate_size),
                           ("attention width", cfg.num_heads * cfg.head_dim)):
            if size % block:
                raise JishiError(f"the model's {what} {size} is not a multiple of the block size {block}; "
                                 f"choose a --block that divides it")
    record = _distill_record(base_model.source)
    qat_grid = method is None and _on_qat_grid(record, merged, block)
    method, why = default_method(quant, method, from_gguf_file, merged, block, record)
    if method == "grid" or (qat_grid and asked_zero_points is None):
        # A GGUF's own blocks run from a float minimum (Q4_1, Q4_K), kept as they are; QAT snapped the weights
        # onto such blocks: the integer default would move every one of them off that grid again.
        zero_points = "exact"
    if recover_steps and (quant != "int4" or method not in ("rtn", "gptq")):
        raise JishiError(f"--recover-steps trains against int4 codes of rtn or gptq, and this build's are by "
                         f"{METHOD_NAMES.get(method, method)}: add --quant int4 --method gptq")
    if method in ("awq", "awq-gptq"):
        # The scales divide the inputs of q/k/v and gate/up: an adapter trained on the unscaled model would read
        # other inputs there.
        if merge_points:
            raise JishiError(f"--method {method} folds input scales into the norms, so adapters trained on the model "
                             "would not fit its merge points: build it with --no-merge-points, or use --method gptq")
        merge_points = False
    name = name or base_model.name
    target = Path(output) if output else default_output(name, quant)
    if merge_points is None:
        merge_points = True
    # With merge points the bundle also holds a graph for requests with no adapter, over the same
    # weights file: without the side paths where they exist only for the merge points (two nodes
    # per projection), and with them as constants where they carry int4's zero-point correction
    # (which onnxruntime prepacks: faster than the same nodes reading inputs).
    weights = numpy_weights(base_model.model, cfg)
    grids = None
    if method == "grid":
        grids = _gguf_grids(base_model, weights, quant, quiet)
    calibration_record = None
    prequantized = grids.weights if grids else None
    if quant == "int4":
        say(f"int4 by {METHOD_NAMES[method]}: {why}")
    if method in CALIBRATED:
        prequantized, calibration_record = _calibrate(base_model, cfg, weights, method, block, damp, act_order,
                                                      calibration, calibration_sequences, min(256, context), quiet,
                                                      exact_zero_points=zero_points == "exact")
    codes_sha256 = recovered = None
    if quant == "int4" and method in ("rtn", "gptq"):
        # Every block projection's codes, here rather than in the graph: their digest goes into the manifest, so
        # that an adapter trained against them (jishi.grid_recovery) can be told from one trained against others.
        from jishi.export.quant import codes_digest
        from jishi.grid_recovery import block_codes

        prequantized = block_codes(cfg, weights, block, zero_points == "exact", prequantized)
        codes_sha256 = codes_digest(prequantized)
        if recover_steps:
            from jishi.distill.grid_lora import GridLoraConfig
            from jishi.grid_recovery import recover

            grid = {"method": method, "block": block, "zero_points": zero_points, "head": f"int{head_bits}",
                    "calibration": (calibration_record or {}).get("text"), "codes_sha256": codes_sha256}
            out_dir = Path(recover_output) if recover_output else Path(str(target) + ".recover")
            adapter_dir, recovered = recover(base_model, cfg, weights, prequantized, grid, out_dir,
                                             GridLoraConfig(steps=recover_steps, rank=recover_rank,
                                                            alpha=2.0 * recover_rank),
                                             head_bits=head_bits, text=calibration, quiet=quiet)
            recovered["source"] = str(adapter_dir)
    if quant == "gguf":
        recipe = QuantRecipe("gguf", block=grids.side_block, accuracy_level=accuracy_level, merge_points=merge_points,
                             zero_point_correction=grids.corrected, method="grid", reason=why)
    else:
        recipe = QuantRecipe(quant, block=block, accuracy_level=accuracy_level, merge_points=merge_points,
                             method=method or "rtn", head_bits=head_bits, reason=why,
                             zero_point_correction=zero_points == "exact")
    side_path = recipe.name in ("int4", "gguf") and recipe.zero_point_correction
    adapter_graph = "model.lora.onnx" if merge_points else None
    rope = rope_tables(base_model.model, cfg)
    with tqdm(total=cfg.num_layers, desc=f"Writing the {quant} graph", unit="layer", disable=quiet, file=sys.stderr) as bar:
        graph = build_decoder(cfg, weights, None, recipe, progress=bar.update, prequantized=prequantized, rope=rope)
    del weights, prequantized
    if grids is not None:
        grids.weights.clear()  # the graph holds them now
    if owned and grids is not None and merged is None and record is None:
        # A GGUF base loaded here: measure the float model on the held-out text now, then let it go, so that
        # it and onnxruntime's session of the bundle are never in memory together.
        if evaluate:
            _reference_first(base_model, context, quiet)
        base_model.model = None

    check_target(target)
    staging = staging_dir(target)
    try:
        if adapter_graph:
            save_model(graph, staging / adapter_graph, data_name="model.onnx.data")
            if recipe.name in ("int4", "gguf"):
                constant_side_paths(staging / adapter_graph, staging / "model.onnx", recipe.block)
            else:
                strip_merge_points(staging / adapter_graph, staging / "model.onnx")
        else:
            save_model(graph, staging / "model.onnx")
        del graph
        (staging / "tokenizer.json").write_text(compact_merges(base_model.tokenizer_json), encoding="utf-8")
        manifest = Manifest(
            name=name,
            config=cfg,
            graph=GraphInfo(
                file="model.onnx",
                data_file="model.onnx.data",
                quantization={**recipe.as_dict(), **(grids.record() if grids else {}),
                              **({"codes_sha256": codes_sha256} if codes_sha256 else {}),
                              **({"calibration": calibration_record} if calibration_record else {})},
                inputs=["input_ids", "seqlens_k", "total_sequence_length", "logits_index", "past_key.*", "past_value.*"],
                outputs=["logits", "hidden_states", "present_key.*", "present_value.*"],
            ),
            tokenizer=tokenizer_info,
            files={},
            defaults=_generation_defaults(base_model.source),
            merge_points={"targets": list(TARGETS), "rank": "dynamic",
                          "a_default": "block_sums" if side_path else "zeros",
                          "block": recipe.block, **({"graph": adapter_graph} if adapter_graph else {})}
                         if recipe.merge_points else None,
            provenance={
                "base": base_model.name,
                "base_source": Path(base_model.source).name,
                "base_sha256": base_model.source_sha256,
                "base_license": base_model.license,
                **({"chat_template": "given at build"} if chat_template is not None else {}),
                **({"merged_adapter": merged} if merged else {}),
                **({"distilled": record} if record else {}),
                **({"calibration": calibration_record["text"]} if calibration_record else {}),
                "built_with": _versions(),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        manifest = with_files(manifest, staging)
        write_manifest(staging, manifest)
        if recovered:
            from jishi.export.adapters import add_adapter
            from jishi.runtime.bundle import open_bundle

            add_adapter(staging, recovered["adapter"], recovered["source"])
            manifest = open_bundle(staging).manifest
        if evaluate:
            say("Measuring quality on held-out text…")
            evaluation = evaluate_bundle(staging, base_model, quiet=quiet)
            if merged:
                size = sum(f.size for f in manifest.files.values())
                evaluation["merged"] = _compare_merged(base_model, quant, evaluation, size, context, quiet)
            versus = _versus_teacher(staging, base_model, teacher, say, quiet)
            if versus:
                evaluation["teacher"] = versus
            if calibration_record:
                evaluation["calibration_check"] = calibration_record["heldout_check"]
            if recovered:
                with_lora = evaluate_bundle(staging, base_model, quiet=quiet, adapter=recovered["adapter"])
                evaluation["recovered"] = {**recovered, "perplexity": with_lora["perplexity"],
                                           "top1_agreement": with_lora["top1_agreement"]}
                say(f"With the {recovered['adapter']} LoRA: held-out perplexity {with_lora['perplexity']:.2f} "
                    f"(without {evaluation['perplexity']:.2f}, float {evaluation['reference_perplexity']:.2f}), "
                    f"top-1 agreement {100 * with_lora['top1_agreement']:.1f}%")
            if quant == "int4":
                evaluation["int4_check"] = _int4_check(evaluation, recipe, say,
                                                       student=record is not None)
            manifest = replace(manifest, evaluation=evaluation)
            write_manifest(staging, manifest)
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"Wrote {target} in {time.time() - t0:.0f} s")
    return target


METHOD_NAMES = {"grid": "the GGUF's own grids", "rtn": "round-to-nearest", "gptq": "GPTQ",
                "awq": "AWQ scaling and round-to-nearest", "awq-gptq": "AWQ scaling and GPTQ"}
DEFAULT_CALIBRATED = "gptq"  # int4 of weights on no 4-bit grid (bench/quant_methods.py measures the choice)
INT4_BOUND = 1.05  # int4 within this times the unquantized model's held-out perplexity; beyond it the build says so


def default_method(quant: str, method: str | None, from_gguf: bool, merged, block: int,
                   record: dict | None) -> tuple[str | None, str]:
    """How the weights of a ``quant`` bundle are coded, and why: ``method`` if one was asked for, else by where
    the weights come from."""
    if quant == "gguf":
        return "grid", "every tensor stays on the GGUF file's own grid (exactly, where onnxruntime has its form)"
    if quant == "int8":
        return "rtn", "8-bit blocks rounded to nearest (a step 16 times finer than int4's)"
    if quant != "int4":
        return None, ""
    if method is not None:
        return method, f"asked for (--method {method})"
    if from_gguf and merged is None and block == 32:
        return "grid", ("the base is a GGUF file: its 4-bit blocks are kept exactly, and tensors of other types are "
                        "rounded to nearest")
    if _on_qat_grid(record, merged, block):
        return "rtn", f"a student trained on this int4 grid (QAT, block {block}), which round-to-nearest keeps exactly"
    if merged is not None:
        what = "a merged adapter moved the weights off the base's grid"
    elif record is not None:
        what = "a distilled student's weights lie on no 4-bit grid"
    elif from_gguf:
        what = f"block {block} is not the GGUF's own 4-bit grid"
    else:
        what = "these weights lie on no 4-bit grid"
    return DEFAULT_CALIBRATED, (f"{what}, so the codes are calibrated on text (round-to-nearest cost a distilled "
                                "20-block student +374% perplexity, GPTQ +33%)")


def _on_qat_grid(record: dict | None, merged, block: int) -> bool:
    """Whether the weights are a QAT student's, trained on int4 blocks of ``block`` (and no adapter merged since)."""
    qat = (record or {}).get("qat") or {}
    return merged is None and qat.get("bits") == 4 and qat.get("block") == block


def _calibrate(base, cfg, weights: dict, method: str, block: int, damp: float, act_order: bool, text: str | None,
               sequences: int, seq_len: int, quiet: bool, exact_zero_points: bool = True):
    """The calibrated int4 codes by weight name (``weights``' norms updated in place where the method scales
    them), and the record of the calibration for the manifest."""
    import hashlib

    from tqdm import tqdm

    from jishi.distill.prune import calibration_batches
    from jishi.export.calibrate import calibrate
    from jishi.heldout import HELDOUT_CHARS, calibration_text

    given = text is not None
    check = check_calibration(text if given else calibration_text(), "the calibration file" if given else "the calibration text")
    batches = calibration_batches(base.runtime_tokenizer(), sequences, seq_len, text=text if given else None)
    with tqdm(total=7 * cfg.num_layers, desc=f"{METHOD_NAMES[method]} on calibration text", unit="weight",
              disable=quiet, file=sys.stderr) as bar:
        cal = calibrate(base.model, cfg, weights, batches, method, 4, block, damp=damp, act_order=act_order,
                        progress=bar.update, exact_zero_points=exact_zero_points)
    weights.update(cal.norms)
    source = (f"a given text ({len(text):,} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]})" if given
              else f"pydoc_data.topics after character {HELDOUT_CHARS} less the lines the held-out text has")
    return cal.codes, {"text": f"{source}, {sequences} sequences of {seq_len} tokens", "sequences": sequences,
                       "tokens_per_sequence": seq_len, "heldout_check": check, **cal.record}


def check_calibration(text: str, where: str = "the calibration text") -> dict:
    """The overlap check of a calibration text against the held-out text; a JishiError when they share a passage
    (the held-out figures of a model calibrated on it would flatter it)."""
    from jishi.heldout import HELDOUT_CHARS, heldout_overlap

    found = heldout_overlap(text)
    if found["in_heldout"]:
        raise JishiError(
            f"{where} holds {found['passages']} passage(s) of the held-out evaluation text (pydoc_data.topics, first "
            f"{HELDOUT_CHARS:,} characters), e.g. {found['first']!r}: the quality measured on it would flatter a model "
            "calibrated on it. Remove those passages, or calibrate on the built-in text (leave --calibration out), "
            "which is free of them")
    return {k: found[k] for k in ("window_chars", "windows", "in_heldout")}


def _int4_check(evaluation: dict, recipe, say, student: bool = False) -> dict:
    """The int4 bundle's measured cost against ``INT4_BOUND``, said, and what to do beyond it."""
    ratio = evaluation["perplexity"] / evaluation["reference_perplexity"]
    out = {"bound": INT4_BOUND, "perplexity_ratio": round(ratio, 4), "within": bool(ratio <= INT4_BOUND)}
    said = (f"int4 by {METHOD_NAMES.get(recipe.method, recipe.method)}: held-out perplexity {evaluation['perplexity']:.2f} "
            f"against the unquantized model's {evaluation['reference_perplexity']:.2f} ({100 * (ratio - 1):+.1f}%), "
            f"top-1 agreement {100 * evaluation['top1_agreement']:.1f}%")
    bound = f"+{100 * (INT4_BOUND - 1):.0f}% bound"
    recovered = evaluation.get("recovered")
    if recovered:
        with_lora = recovered["perplexity"] / evaluation["reference_perplexity"]
        out.update(recovered_ratio=round(with_lora, 4), recovered_within=bool(with_lora <= INT4_BOUND))
    if out["within"]:
        say(f"{said}: within the {bound}")
    elif recovered and out["recovered_within"]:
        say(f"{said}; with its {recovered['adapter']} LoRA {100 * (with_lora - 1):+.1f}%, within the {bound}: "
            f"use the bundle with --adapter {recovered['adapter']}")
    else:
        advice = ["rebuild with --quant int8: 8-bit blocks keep such weights within about 1% (a larger bundle)"]
        if recipe.method in ("rtn", "gptq") and not recovered:
            advice.append("or add --recover-steps 24: a LoRA trained against these very codes, used with --adapter "
                          "recover (a distilled 20-block student: GPTQ +6.9% -> +4.5%)")
        if recipe.method != "grid" and recipe.block > 16:
            advice.append(f"or --block 16: finer blocks than {recipe.block} (that student: +4.5%, in a bundle 16% "
                          "larger that decodes at 0.73x the speed)")
        if student:
            advice.append("or train the student on the int4 grid (jishi distill --init STUDENT --qat)")
        out["advice"] = "; ".join(advice)
        say(f"warning: {said}, beyond the {bound} for int4: {out['advice']}")
    return out


def _check_teacher_tokenizer(base, teacher) -> None:
    """A student measured against a teacher must share its tokenizer (the same ids for the same text): a
    BaseModelError before anything is built, when it does not."""
    from jishi.distill.base import LoadedBase, load_tokenizer, resolve, tokenizer_difference
    from jishi.errors import BaseModelError

    if teacher is None:
        if _distill_record(base.source) is None:
            return
        from jishi.evaluation import default_teacher

        teacher = default_teacher(base.source)
        if teacher is None:
            return
    if isinstance(teacher, LoadedBase):
        tok, vocab, label = teacher.tokenizer, teacher.model.config.vocab_size, teacher.name
    else:
        from jishi.planning import model_shape

        _, path = resolve(teacher)
        tok, vocab, label = load_tokenizer(path), model_shape(str(path)).vocab, str(teacher)
    mine = base.model.config.vocab_size
    why = f"a vocabulary of {mine:,} tokens against {vocab:,}" if mine != vocab else tokenizer_difference(base.tokenizer, tok)
    if why:
        raise BaseModelError(
            f"{Path(base.source).name} does not share its teacher {label}'s tokenizer ({why}), so the two cannot be "
            "compared token by token: pass the model it was distilled from as the teacher (--teacher), or build "
            "it without one")


def _reference_first(base, context: int, quiet: bool) -> None:
    """The base's held-out figures, computed before the bundle exists (cached on ``base`` as
    ``evaluate_bundle`` computes and looks them up: same tokenizer, same windows)."""
    from tqdm import tqdm

    from jishi.distill.evaluate import reference_stats

    ids = base.runtime_tokenizer().encode(heldout_text(), bos=False)
    wins = windows(ids, min(WINDOW, context))
    key = (len(wins), len(wins[0])) if wins else None
    if key and key not in base.reference_stats:
        with tqdm(total=len(wins), desc="Held-out windows (float model)", disable=quiet, file=sys.stderr) as bar:
            base.reference_stats[key] = reference_stats(base.model, wins, progress=bar.update)


def check_build_memory(base, quant: str | None, evaluate: bool = True, calibrated: bool = False) -> int:
    """The memory (bytes) building ``base`` takes, estimated from its config alone (``calibrated``: int4 codes
    calibrated on text, the default for weights that are not a GGUF file's); a DeviceFitError when it is more
    than this machine has available now."""
    from jishi.devices.detect import detect
    from jishi.devices.plan import build_memory
    from jishi.distill.base import DEFAULT_BASE
    from jishi.errors import DeviceFitError
    from jishi.planning import model_shape

    from jishi.distill.base import KNOWN_BASES

    spec = str(base or DEFAULT_BASE)
    if not Path(spec).expanduser().exists() and spec.lower() not in KNOWN_BASES:
        return 0  # loading says what it is not
    try:
        shape = model_shape(spec)
    except (KeyError, TypeError, ValueError):  # a config of another kind: loading it says what is wrong
        return 0
    gguf = not Path(spec).is_dir()
    need = build_memory(shape, quant or ("gguf" if gguf else "int4"), gguf=gguf, evaluate=evaluate,
                        calibrated=calibrated and not (gguf and quant in (None, "gguf")))
    available = detect().available_bytes
    if available and need > available:
        params = shape.linear_params + shape.embedding_params * (1 if shape.tied else 2)
        raise DeviceFitError(
            f"building {shape.name} needs about {need / 2**30:.1f} GiB of memory (its {params / 1e9:.2f} B parameters "
            f"are held in float32 while the bundle is written and measured) and {available / 2**30:.1f} GiB are "
            "available now: close other programs, or build on a machine with more memory (the bundle itself runs in "
            "far less), or pass --no-memory-check to try anyway")
    return need


def _with_template(base, info, text: str):
    """The tokenizer entry with this chat template, which must parse as the runtime will read it."""
    from jishi.runtime.tokenizer import Tokenizer

    if not isinstance(text, str) or not text.strip():
        raise JishiError("the chat template is empty: give the text of a Jinja chat template")
    info = replace(info, chat_template=text)
    try:
        Tokenizer(None, info, json_text=base.tokenizer_json)
    except JishiError as e:
        raise JishiError(f"the chat template given does not parse ({e}); fix it and build again") from None
    return info


def _gguf_grids(base, weights: dict, quant: str, quiet: bool):
    """The GGUF base's tensors on their own grids (``gguf``), or its 4-bit ones only (``int4``)."""
    from tqdm import tqdm

    from jishi.distill.gguf_tensors import read_raw
    from jishi.export.from_gguf import grid_weights

    raw = read_raw(Path(base.source), base.model, names=set(weights))
    with tqdm(total=len(raw), desc="Reading the GGUF's blocks", unit="tensor", disable=quiet, file=sys.stderr) as bar:
        plan = grid_weights(raw, weights, mode=quant, progress=bar.update)
    if not quiet:
        moved = sum(c for counts in plan.requantized.values() for c in counts.values())
        if moved:
            print(f"{moved} tensors are re-quantized ({'their type has no 4-bit form' if quant == 'int4' else 'no exact form'}); "
                  "the evaluation measures the cost", file=sys.stderr)
        for note in plan.notes[:5]:
            print(f"note: {note}", file=sys.stderr)
    return plan


MERGED_INT4_BUDGET = 0.03  # int4 is recommended for a merged bundle if it moves perplexity at most this much
MERGED_AGREEMENT_SLACK = 0.05  # ... and its top-1 agreement with the merged weights is within this of int8's


def merged_base(base, name: str, adapter_dir: str | Path):
    """A copy of ``base`` with the PEFT adapter's ``B·A`` added to its weights, and a record of it."""
    import copy

    import torch

    from jishi.export.adapters import check_base, read_peft
    from jishi.export.from_torch import model_config
    from jishi.runtime.adapters import check_params

    from jishi.families import source_projections

    from jishi.errors import AdapterError
    from jishi.export.adapters import grid_of

    if grid_of(adapter_dir):
        raise AdapterError(f"adapter {name} was trained against int4 codes, as a correction of those weights: it "
                           "cannot be merged into the float weights; add it at run time to the bundle of those codes")
    cfg = model_config(base.model.config, 16)
    params, config = read_peft(adapter_dir, cfg)
    trained_on = check_base(adapter_dir, config, {"base": base.name, "base_source": Path(base.source).name,
                                                  "base_sha256": base.source_sha256})
    rank, targets = check_params(name, params, cfg)
    where = source_projections(cfg)
    model = copy.deepcopy(base.model)
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in params.items():
            if not key.endswith(".lora_A"):
                continue
            _, layer, target, _ = key.split(".")
            part = "self_attn" if target in ("q", "k", "v", "o") else "mlp"
            module, start, stop = where[target]
            delta = a @ params[key[:-1] + "B"]  # (in, out)
            weights[f"model.layers.{layer}.{part}.{module}.weight"][start:stop] += torch.from_numpy(delta.T.copy())
    record = {"name": name, "source": Path(adapter_dir).name, "rank": rank, "targets": list(targets),
              "alpha": config.get("lora_alpha"), "base_sha256": trained_on or base.source_sha256}
    return replace(base, model=model, reference_stats={}), record


def _compare_merged(base, quant: str, evaluation: dict, size: int, context: int, quiet: bool) -> dict:
    """Quality of the merged weights at int4 and at int8 (one of them is this bundle), and the choice."""
    import tempfile

    from jishi.runtime.bundle import open_bundle

    figures = {}
    for q in ("int4", "int8"):
        if q == quant:
            ev, q_size = evaluation, size
        else:
            with tempfile.TemporaryDirectory(prefix="jishi-merged-") as tmp:
                other = open_bundle(build(base, q, Path(tmp) / "b", context=context, quiet=True, merge_points=False))
                ev, q_size = other.manifest.evaluation, other.size
        figures[q] = {"perplexity": ev["perplexity"], "top1_agreement": ev["top1_agreement"],
                      "loss": round(ev["perplexity"] / ev["reference_perplexity"] - 1, 4), "size_mb": round(q_size / 1e6, 1)}
    ref = evaluation["reference_perplexity"]
    four, eight = figures["int4"], figures["int8"]
    # int4 must keep what the merged weights do: an adapter's change to a 4-bit base is often
    # smaller than half a 4-bit step, and rounding then puts the weights back on the base's grid.
    keeps = abs(four["loss"]) <= MERGED_INT4_BUDGET and four["top1_agreement"] >= eight["top1_agreement"] - MERGED_AGREEMENT_SLACK
    if keeps:
        pick = "int4"
        why = (f"int4 keeps the merged weights' behaviour (perplexity {100 * four['loss']:+.1f}%, top-1 agreement "
               f"{100 * four['top1_agreement']:.0f}%) and is smaller and faster")
    else:
        pick = "int8"
        why = (f"int4 loses the adapter (perplexity {100 * four['loss']:+.1f}%, top-1 agreement with the merged weights "
               f"{100 * four['top1_agreement']:.0f}%; int8 {100 * eight['loss']:+.1f}%, {100 * eight['top1_agreement']:.0f}%): "
               "use int8, or the base's int4 bundle with the adapter added at run time")
    if not quiet:
        print(f"Merged weights: int4 perplexity {figures['int4']['perplexity']:.2f}, int8 {figures['int8']['perplexity']:.2f} "
              f"(fp32 {ref:.2f}); recommended: {pick}", file=sys.stderr)
    return {"reference_perplexity": ref, **figures, "recommended": pick, "reason": why}


def evaluate_bundle(bundle_dir: Path, base, quiet: bool = False, max_windows: int | None = None,
                    adapter: str | None = None) -> dict:
    """Perplexity of the bundle (with ``adapter`` active, if given) and of the torch base on the held-out text, and
    their top-1 agreement.

    The base's figures are computed once per base and window size and kept on it.
    """
    from tqdm import tqdm

    from jishi.distill.evaluate import reference_stats
    from jishi.runtime.model import load

    model = load(bundle_dir)
    if adapter:
        model.use_adapter(adapter)
    ids = model.tokenizer.encode(heldout_text(), bos=False)
    wins = windows(ids, min(WINDOW, model.context))[:max_windows]
    if not wins:
        raise JishiError("the held-out text is shorter than one window for this tokenizer")
    cache = base.reference_stats
    key = (len(wins), len(wins[0]))
    todo = len(wins) * (1 + (key not in cache))
    with tqdm(total=todo, desc="Held-out windows", disable=quiet, file=sys.stderr) as bar:
        if key not in cache:
            cache[key] = reference_stats(base.model, wins, progress=bar.update)
        ref_logp, ref_top = cache[key]
        nll, agree = 0.0, 0.0
        for win, top in zip(wins, ref_top):
            model.engine.reset()
            logits = model.engine.feed(win, all_logits=True)
            logz = _logsumexp_rows(logits)
            nll -= (logits[np.arange(len(win) - 1), win[1:]].astype(np.float64) - logz[:-1]).sum()
            agree += float((logits.argmax(-1) == top).mean())
            bar.update(1)
    n = sum(len(w) - 1 for w in wins)
    ref_nll = -sum(float(lp.sum()) for lp in ref_logp)
    return {
        "heldout": f"pydoc_data.topics, first 20000 characters, {len(wins)} windows of {len(wins[0])} tokens, no BOS",
        "perplexity": round(float(np.exp(nll / n)), 4),
        "reference_perplexity": round(float(np.exp(ref_nll / n)), 4),
        "top1_agreement": round(agree / len(wins), 4),
        "accuracy_level": model.manifest.graph.quantization.get("accuracy_level"),
    }


def _logsumexp_rows(logits: np.ndarray, rows: int = 32) -> np.ndarray:
    """log Σ exp of each row in float64, a few rows at a time (a 262,144-token vocabulary makes a
    512-token window's float64 copy a gigabyte)."""
    out = np.empty(len(logits), np.float64)
    for a in range(0, len(logits), rows):
        x = logits[a:a + rows].astype(np.float64)
        m = x.max(axis=-1, keepdims=True)
        out[a:a + rows] = (np.log(np.exp(x - m).sum(axis=-1, keepdims=True)) + m)[:, 0]
    return out


def _versus_teacher(bundle_dir: Path, base, teacher, say, quiet: bool) -> dict | None:
    """A student bundle's perplexity, top-1 agreement and KL against its teacher on the held-out text."""
    from jishi.distill.base import LoadedBase
    from jishi.evaluation import default_teacher, evaluate_models

    if teacher is None:
        if _distill_record(base.source) is None:
            return None
        teacher = default_teacher(base.source)
        if teacher is None:
            say("note: the student's teacher is not on this machine, so the bundle is not measured against it")
            return None
    say("Measuring it against the teacher…")
    loaded = teacher if isinstance(teacher, LoadedBase) else None
    rows, info = evaluate_models([str(bundle_dir)], None if loaded else str(teacher), decode_tokens=0, quiet=quiet,
                                 teacher_loaded=loaded)
    r = rows[0]
    return {"name": loaded.name if loaded else Path(str(teacher)).name, "perplexity": round(info["teacher_perplexity"], 4),
            "student_perplexity": round(r.perplexity, 4), "top1_agreement": round(r.top1_agreement, 4),
            "kl": round(r.kl, 5), "windows": info["windows"], "window": info["window"]}


def _distill_record(source: str) -> dict | None:
    """What a student directory says of its teacher and training (for the bundle's provenance)."""
    import json

    path = Path(source) / "jishi_distill.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    training = rec.get("training") or {}  # None for a pruned, untrained student
    return {"teacher": rec.get("teacher"), "plan": rec.get("plan"), "data": rec.get("data"), "qat": rec.get("qat"),
            "heldout": rec.get("heldout"), "steps": training.get("steps_done", 0), "tokens": training.get("tokens", 0)}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jishi", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _generation_defaults(source) -> dict:
    """The sampling defaults a Hugging Face base directory's generation_config.json sets."""
    from jishi.runtime.defaults import from_generation_config

    return from_generation_config(source) if Path(source).is_dir() else {}
