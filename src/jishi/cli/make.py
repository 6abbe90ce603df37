"""Making bundles and students: `jishi build`, `jishi distill`, `jishi finetune`, `jishi eval`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jishi.errors import JishiError

from .common import key_values, named_dir, read_template, read_text_file


def register(sub) -> None:
    b = sub.add_parser("build", help="export a base model to a bundle")
    b.add_argument("--base", help="known base name (default smollm2-135m-instruct), a GGUF file or a Hugging Face directory")
    b.add_argument("--quant", choices=["gguf", "int4", "int4-gptq", "int8", "fp16", "fp32"],
                   help="weight format (default: gguf for a GGUF base, which keeps every tensor on the file's own grid, "
                        "4- or 8-bit; int4 otherwise; or the plan's choice with --device); int4 on a GGUF base keeps its "
                        "4-bit blocks and re-quantizes the rest; int4-gptq is int4 --method gptq")
    b.add_argument("--method", choices=["rtn", "gptq", "awq", "awq-gptq"],
                   help="how int4 codes are found (default: by the weights: a GGUF base keeps its own 4-bit grid, a QAT "
                        "student its trained grid, anything else gets gptq): rtn rounds to nearest; gptq is GPTQ on "
                        "calibration text; awq scales the inputs of q/k/v and gate/up by their activations (folded into "
                        "the norms; no merge points), then rounds; awq-gptq scales, then GPTQ")
    b.add_argument("--calibrated", action="store_true", help="the same as --method gptq")
    b.add_argument("--calibration", metavar="FILE",
                   help="calibrate on this text file (default: the built-in text after the held-out part); a file that "
                        "shares a passage with the held-out text is refused")
    b.add_argument("--calibration-sequences", type=int, default=16,
                   help="calibration sequences of 256 tokens (default 16)")
    b.add_argument("--damp", type=float,
                   help="GPTQ damping: this fraction of the mean Hessian diagonal is added to it (default 0.01)")
    b.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ by activation order (the loudest inputs first), every block's grid fixed up front from "
                        "the original weights (the default); --no-act-order walks in input order, each block's grid "
                        "chosen as GPTQ reaches it")
    b.add_argument("--zero-points", choices=["exact", "integer"],
                   help="int4 by rtn/gptq/awq: exact puts each block's grid on its weights' minimum and maximum (a "
                        "correction path beside every projection, slower to run); integer keeps 0 on the grid and its "
                        "zero point a code, onnxruntime's own form (default: see the building guide)")
    b.add_argument("--block", type=int, default=32, help="int4/int8 block size along the input (16, 32, 64, 128; default 32)")
    b.add_argument("--head", choices=["int8", "int4"], default="int8",
                   help="int4/int8 bundles: bits of the embedding table and LM head (default int8, which keeps a Q8_0 "
                        "base's exactly; int4 is smaller, measure it with the build's evaluation)")
    b.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template (Hugging Face style) stored in the bundle in place of the base's own; "
                        "a pretrained base such as gemma3-270m has none, so chat needs one")
    b.add_argument("--no-memory-check", action="store_true",
                   help="build even if the estimated memory the build needs is more than is available now")
    b.add_argument("--device", help="plan the build for this device profile (see `jishi devices`) or 'detect'")
    b.add_argument("-o", "--output", help="bundle directory (default ./bundles/<name>-<quant>)")
    b.add_argument("--name", help="model name in the manifest (default: from the base)")
    b.add_argument("--context", type=int, help="context window in tokens (default: the model's positions, at most 2048)")
    b.add_argument("--no-eval", action="store_true", help="skip measuring quality on held-out text")
    mp = b.add_mutually_exclusive_group()
    mp.add_argument("--merge-points", action="store_true", default=None,
                    help="LoRA merge points on all seven projections (the default)")
    mp.add_argument("--no-merge-points", dest="merge_points", action="store_false",
                    help="leave them out: a bundle that takes no adapters")
    b.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="add a PEFT LoRA adapter; may be repeated")
    b.add_argument("--merge", metavar="NAME", help="fold the --adapter NAME into the weights before quantization: a "
                   "single-task bundle without merge points (its quality at int4 and int8 is measured)")
    b.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="int4: train a LoRA for N steps against the bundle's own int4 codes, following the float model "
                        "on the calibration text, and add it as the adapter 'recover' (run with --adapter recover); "
                        "the PEFT adapter is kept in OUTPUT.recover")
    b.add_argument("--recover-rank", type=int, default=16, help="rank of the --recover-steps LoRA (default 16)")
    b.add_argument("--distill", action="store_true",
                   help="first make a smaller student of --base (pruned and distilled; needs --layers or --keep-ratio), "
                        "then build it: one stage; int4 is then GPTQ-calibrated unless --qat")
    dg = b.add_argument_group("distillation (with --distill; the same options as `jishi distill`)")
    dg.add_argument("--student", metavar="DIR", help="where the student's Hugging Face directory goes (default OUTPUT.student; "
                    "its checkpoints in DIR.work/ for --resume)")
    b.set_defaults(distill_defaults=distill_options(b, dg, with_init=False) | {"student": None})
    b.set_defaults(func=build)

    ds = sub.add_parser("distill", help="prune a base into a smaller student and distil it (a Hugging Face directory)")
    ds.add_argument("--base", help="teacher: known base name (default smollm2-135m-instruct), a GGUF file or a Hugging Face directory")
    distill_options(ds, ds)
    ds.add_argument("--block", type=int, default=32, help="int4 block size for --qat (default 32)")
    ds.add_argument("-o", "--output", required=True, help="student directory to write")
    ds.set_defaults(func=distill)

    ev = sub.add_parser("eval", help="perplexity, agreement and KL with the teacher, size and speed, as a table")
    ev.add_argument("models", nargs="*", metavar="BUNDLE_OR_DIR")
    ev.add_argument("--compare", nargs="+", metavar="MODEL", default=[], help="more models, side by side")
    ev.add_argument("--teacher", help="the reference model (default: the teacher a student records)")
    ev.add_argument("--data", metavar="FILE", help="a text file to measure on (default: the held-out text)")
    ev.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--max-windows", type=int, help="measure on at most this many windows")
    ev.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens timed for decode speed (default 64)")
    ev.add_argument("--threads", type=int)
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.set_defaults(func=evaluate)

    ft = sub.add_parser("finetune", help="train a LoRA adapter (PEFT format) on chat records")
    ft.add_argument("--base", help="known base name (default smollm2-135m-instruct), a GGUF file or a Hugging Face directory")
    ft.add_argument("--data", required=True, help="JSONL: {\"messages\": [...]} or {\"prompt\": ..., \"response\": ...} per line")
    ft.add_argument("--name", help="adapter name (default: the output directory's name)")
    ft.add_argument("-o", "--output", required=True, help="adapter directory to write")
    ft.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ft.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    ft.add_argument("--targets", default="q,k,v,o,gate,up,down", help="projections to adapt (default: all seven)")
    ft.add_argument("--epochs", type=float, default=2.0, help="passes over the data (default 2)")
    ft.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--max-length", type=int, default=256, help="tokens per record, longer ones are cut (default 256)")
    ft.add_argument("--heldout", type=float, default=0.1, help="fraction of records kept out to evaluate on (default 0.1)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    ft.set_defaults(func=finetune)


def distill_options(parser, group, with_init: bool = True) -> dict:
    """The student's size, data and training options (shared by `distill` and `build --distill`);
    returns each option's default."""
    dests = []
    size = group.add_mutually_exclusive_group()

    def add(*names, into=group, **kw):
        dests.append(into.add_argument(*names, **kw).dest)

    add("--layers", into=size, type=int, help="blocks the student keeps")
    add("--keep-ratio", into=size, type=float, help="fraction of the blocks the student keeps")
    if with_init:
        size.add_argument("--init", metavar="STUDENT_DIR",
                          help="continue training a student written by jishi distill (e.g. --qat after plain distillation)")
    add("--width-ratio", type=float, help="fraction of the MLP channels kept in every block (default all)")
    add("--head-ratio", type=float, help="fraction of the attention (query) heads kept in every block, the same "
        "number per key/value group (default all)")
    add("--select", default="influence", choices=["influence", "skip-loss", "even"],
        help="how blocks are chosen: block influence, loss when skipped, or evenly spaced (default influence)")
    add("--data", nargs="+", metavar="FILE",
        help="text files and JSONL ({\"text\": ...} or {\"messages\": [...]}); default: text the teacher writes "
             "from built-in prompts (cached)")
    add("--generate", type=int, metavar="N", help="how many of the 48 built-in prompts the teacher answers to make "
        "data (default: all of them without --data, none with it; with --data they are added)")
    add("--generate-tokens", type=int, default=192, help="longest teacher answer in tokens (default 192)")
    add("--steps", type=int, default=200, help="optimizer steps (default 200)")
    add("--batch-size", type=int, default=8, help="sequences per step, all processes together (default 8)")
    add("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    add("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    add("--lr", type=float, help="peak learning rate (default 2e-4; 1e-3 with --qat, whose weights must move across "
        "4-bit steps)")
    add("--temperature", type=float, default=2.0, help="KL temperature (default 2)")
    add("--ce-weight", type=float, default=0.5, help="weight of cross-entropy on real text (default 0.5)")
    add("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state loss on mapped blocks (default 0)")
    add("--teacher-topk", type=int, help="cache the teacher's top-K log-probs on disk instead of running it every step")
    add("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    add("--qat", action="store_true", help="train with fake-quantized int4 weights; the saved weights lie on the int4 grid")
    add("--eval-every", type=int, default=25, help="held-out KL and NLL every N steps (default 25)")
    add("--checkpoint-every", type=int, default=25, help="checkpoint every N steps (default 25)")
    add("--resume", action="store_true", help="continue from the checkpoint in the student's .work/ directory")
    add("--seed", type=int, default=0)
    add("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return {d: parser.get_default(d) for d in dests}


def build(args) -> int:
    from jishi.devices.plan import plan
    from jishi.pipeline import build as build_bundle
    from jishi.planning import model_shape, profile_for

    method = args.method
    for alias, given in (("--calibrated", args.calibrated), ("--quant int4-gptq", args.quant == "int4-gptq")):
        if given and method not in (None, "gptq"):
            raise JishiError(f"{alias} means --method gptq, and --method {method} was asked for: give one of them")
        if given:
            method = "gptq"
    if args.quant == "int4-gptq":
        args.quant = "int4"
    quant = args.quant  # None: the pipeline's default for this base (gguf for a GGUF file, else int4)
    if args.device:
        profile = profile_for(args.device)
        shape = model_shape(args.base or "smollm2-135m-instruct")
        _, best, why = plan(shape, profile, args.context)
        if best is None:
            raise JishiError(f"{shape.name} with context {args.context} does not fit {profile.id}: {why}")
        if args.quant and args.quant != best.quant:
            print(f"note: the plan for {profile.id} recommends {best.quant}; building {args.quant} as asked", file=sys.stderr)
        quant = args.quant or best.quant
        print(f"plan for {profile.id}: {why}", file=sys.stderr)
    adapters = [named_dir(a) for a in args.adapter]
    merge = None
    if args.merge:
        merge = next((a for a in adapters if a[0] == args.merge), None)
        if merge is None:
            raise JishiError(f"--merge {args.merge} needs the adapter given as --adapter {args.merge}=DIR")
        if len(adapters) > 1 or args.merge_points:
            raise JishiError("a merged bundle has no merge points, so it takes no other adapters: build it with "
                             "--adapter NAME=DIR --merge NAME only")
        adapters = []
    if method and quant not in ("int4", None):
        raise JishiError(("--calibrated" if args.calibrated else f"--method {method}") + f" applies to int4 only, not {quant}")
    if args.calibration_sequences < 1:
        raise JishiError("--calibration-sequences must be at least 1")
    calibration = read_text_file(args.calibration, "the calibration file") if args.calibration else None
    base, teacher = args.base, None
    if args.distill:
        quant = quant or "int4"
        base, teacher = distill_for_build(args, quant)
        if base is None:  # another process of a torchrun: rank 0 builds
            return 0
    else:
        given = [n for n, default in args.distill_defaults.items() if getattr(args, n) != default]
        if given:
            raise JishiError(f"--{given[0].replace('_', '-')} is a distillation option: add --distill to make a student "
                             "first, or use `jishi distill`")
    path = build_bundle(base, quant, args.output, args.name, args.context, evaluate=not args.no_eval,
                 merge_points=True if adapters else args.merge_points, merge=merge, method=method,
                 damp=args.damp, act_order=args.act_order, calibration=calibration,
                 calibration_sequences=args.calibration_sequences,
                 block=args.block, teacher=teacher, head_bits=int(args.head[3:]),
                 chat_template=read_template(args.chat_template) if args.chat_template else None,
                 check_memory=not args.no_memory_check, zero_points=args.zero_points,
                 recover_steps=args.recover_steps, recover_rank=args.recover_rank)
    if adapters:
        from jishi.export.adapters import add_adapter

        for name, directory in adapters:
            add_adapter(path, name, directory)
    print(path)
    return 0


def distill_for_build(args, quant: str):
    """`build --distill`: the student first (resumable), then the build of it; returns (student dir, teacher).
    The build codes its int4 as any student's: GPTQ, or round-to-nearest on the grid a QAT student was trained on."""
    from jishi.distill.base import load_base
    from jishi.distill.student import distill
    from jishi.pipeline import default_output

    if args.merge:
        raise JishiError("--merge and --distill do not go together: distil first, then fine-tune the student")
    from pathlib import Path

    from jishi.distill.student import read_record

    options, config = distill_settings(args)
    teacher = load_base(args.base)
    size = f"L{args.layers}" if args.layers else f"k{args.keep_ratio:g}"
    args.name = args.name or f"{teacher.name}-{size}"
    args.output = args.output or str(default_output(args.name, quant))
    student = Path(args.student) if args.student else Path(args.output).with_name(Path(args.output).name + ".student")
    done = read_record(student) if student.is_dir() else None
    if args.resume and done and done["training"]["steps_done"] >= config.steps and done["teacher"]["sha256"] == teacher.source_sha256:
        print(f"{student} is already distilled ({config.steps} steps): building it", file=sys.stderr)
    elif distill(teacher, student, options, config) is None:
        return None, None
    print(f"student: {student}", file=sys.stderr)
    return str(student), teacher


def finetune(args) -> int:
    from jishi.errors import MissingExtraError

    try:
        from jishi.distill.finetune import FinetuneConfig, finetune
    except ImportError as e:
        raise MissingExtraError("build", f"fine-tuning ({e.name})") from None
    config = FinetuneConfig(rank=args.rank, alpha=args.alpha, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                            epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            heldout=args.heldout, seed=args.seed, threads=args.threads)
    res = finetune(args.base, args.data, args.output, name=args.name, config=config)
    rows = [["records", f"{res.train_records} train, {res.heldout_records} held out"],
            ["steps", f"{res.steps} ({res.tokens} tokens, {res.seconds:.0f} s)"]]
    if res.heldout_loss_after is not None:
        rows.append(["held-out loss", f"{res.heldout_loss_before:.3f} → {res.heldout_loss_after:.3f} nats/token"])
    print(key_values(rows))
    print(f"Wrote {res.output}; add it with `jishi adapter add BUNDLE {args.name or res.output.name}={res.output}`")
    return 0


def distill(args) -> int:
    from jishi.distill.student import distill as distill_student

    options, config = distill_settings(args)
    out = distill_student(args.base, args.output, options, config)
    if out is not None:
        print(out)
    return 0


DISTILL_LR = 2e-4
QAT_LR = 1e-3  # measured: 40 QAT steps of the 20-block student reach held-out KL 0.77 at 1e-3, 1.21 at 1e-4


def distill_settings(args):
    """``DistillOptions`` and ``KDConfig`` from the command line, checked."""
    from jishi.errors import MissingExtraError

    try:
        from jishi.distill.kd import KDConfig
        from jishi.distill.student import DistillOptions
    except ImportError as e:
        raise MissingExtraError("build", f"distillation ({e.name})") from None
    init = getattr(args, "init", None)
    if args.layers is None and args.keep_ratio is None and init is None:
        raise JishiError("say how small the student is: --layers N or --keep-ratio R"
                         + (" (or --init STUDENT_DIR to continue one)" if hasattr(args, "init") else ""))
    for flag in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "grad_accum"):
        if getattr(args, flag) < 1:
            raise JishiError(f"--{flag.replace('_', '-')} must be at least 1")
    for f in args.data or ():
        if not os.path.isfile(f):
            raise JishiError(f"no data file {f}")
    config = KDConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                      learning_rate=args.lr or (QAT_LR if args.qat else DISTILL_LR), temperature=args.temperature, ce_weight=args.ce_weight,
                      hidden_weight=args.hidden_weight, teacher_topk=args.teacher_topk, bf16=args.bf16,
                      eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                      qat_bits=4 if args.qat else None, qat_block=args.block)
    options = DistillOptions(layers=args.layers, keep_ratio=args.keep_ratio, width_ratio=args.width_ratio,
                             head_ratio=args.head_ratio,
                             method=args.select, data=tuple(args.data or ()), resume=args.resume, threads=args.threads,
                             generated_prompts=args.generate, generated_tokens=args.generate_tokens, init=init)
    return options, config


def evaluate(args) -> int:
    from pathlib import Path

    from jishi.errors import MissingExtraError

    try:
        from jishi.evaluation import evaluate_models, table
    except ImportError as e:
        raise MissingExtraError("build", f"evaluation against a teacher ({e.name})") from None
    specs = list(args.models) + list(args.compare)
    if not specs:
        raise JishiError("name a bundle or model directory to evaluate (and --compare B C for more)")
    for spec in specs:
        if not Path(spec).exists() and "/" in spec:
            raise JishiError(f"no bundle or model directory {spec}")
    text = read_text_file(args.data, "the text file") if args.data else None
    if args.window < 8:
        raise JishiError("--window must be at least 8 tokens")
    rows, info = evaluate_models(specs, args.teacher, text, args.window, args.max_windows, args.decode_tokens,
                                 args.threads)
    if args.json:
        import json

        print(json.dumps({**info, "models": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(f"against {info['teacher']} (perplexity {info['teacher_perplexity']:.2f}) on the {info['text']}: "
              f"{info['windows']} windows of {info['window']} tokens\n")
        print(table(rows))
    return 0
