"""The ``jishi`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from jishi import __version__
from jishi.errors import JishiError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # model text on a console that cannot show it: never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except JishiError as e:
        if args.debug:
            raise
        print(f"jishi: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `jishi run ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jishi", description="Shrink, export and run a language model offline.")
    p.add_argument("--version", action="version", version=f"jishi {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    b = sub.add_parser("build", help="export a base model to a bundle")
    b.add_argument("--base", help="known base name (default smollm2-135m-instruct), a GGUF file or a Hugging Face directory")
    b.add_argument("--quant", choices=["int4", "int4-gptq", "int8", "fp16", "fp32"],
                   help="weight format (default int4, or the plan's choice with --device); int4-gptq is int4 --calibrated")
    b.add_argument("--calibrated", action="store_true",
                   help="int4 codes by GPTQ on calibration text instead of round-to-nearest (for weights off any 4-bit "
                        "grid: students, fine-tuned models; the default base keeps its own grid exactly without it)")
    b.add_argument("--block", type=int, default=32, help="int4/int8 block size along the input (16, 32, 64, 128; default 32)")
    b.add_argument("--head", choices=["int8", "int4"], default="int8",
                   help="int4/int8 bundles: bits of the embedding table and LM head (default int8, which keeps a Q8_0 "
                        "base's exactly; int4 is smaller, measure it with the build's evaluation)")
    b.add_argument("--device", help="plan the build for this device profile (see `jishi devices`) or 'detect'")
    b.add_argument("-o", "--output", help="bundle directory (default ./bundles/<name>-<quant>)")
    b.add_argument("--name", help="model name in the manifest (default: from the base)")
    b.add_argument("--context", type=int, default=2048, help="context window in tokens (default 2048)")
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
    b.add_argument("--distill", action="store_true",
                   help="first make a smaller student of --base (pruned and distilled; needs --layers or --keep-ratio), "
                        "then build it: one stage; int4 is then GPTQ-calibrated unless --qat")
    dg = b.add_argument_group("distillation (with --distill; the same options as `jishi distill`)")
    dg.add_argument("--student", metavar="DIR", help="where the student's Hugging Face directory goes (default OUTPUT.student; "
                    "its checkpoints in DIR.work/ for --resume)")
    b.set_defaults(distill_defaults=_distill_options(b, dg, with_init=False) | {"student": None})
    b.set_defaults(func=_build)

    ds = sub.add_parser("distill", help="prune a base into a smaller student and distil it (a Hugging Face directory)")
    ds.add_argument("--base", help="teacher: known base name (default smollm2-135m-instruct), a GGUF file or a Hugging Face directory")
    _distill_options(ds, ds)
    ds.add_argument("--block", type=int, default=32, help="int4 block size for --qat (default 32)")
    ds.add_argument("-o", "--output", required=True, help="student directory to write")
    ds.set_defaults(func=_distill)

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
    ev.set_defaults(func=_eval)

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
    ft.set_defaults(func=_finetune)

    for name, help_text in (("run", "answer one prompt, streaming"), ("chat", "chat in the terminal")):
        r = sub.add_parser(name, help=help_text)
        r.add_argument("bundle", help="bundle directory or installed model name")
        if name == "run":
            r.add_argument("prompt", help="the prompt ('-' reads standard input)")
            r.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
        else:
            r.add_argument("--system", help="system prompt")
        r.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer (default 256)")
        r.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
        r.add_argument("--top-k", type=int, default=40)
        r.add_argument("--top-p", type=float, default=0.95)
        r.add_argument("--repetition-penalty", type=float, default=1.1)
        r.add_argument("--seed", type=int)
        r.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
        r.add_argument("--context", type=int, help="context window (default: the bundle's)")
        r.add_argument("--force", action="store_true", help="load even if the model seems too big for free memory")
        r.add_argument("--adapter", help="use this adapter of the bundle (see `jishi adapter list`)")
        r.add_argument("--verbose", action="store_true", help="say which onnxruntime settings were chosen, and why")
        r.set_defaults(func=_run if name == "run" else _chat)

    k = sub.add_parser("keygen", help="write an Ed25519 key pair for signing bundles")
    k.add_argument("-o", "--output", required=True, help="PREFIX: writes PREFIX (private) and PREFIX.pub")
    k.set_defaults(func=_keygen)

    s = sub.add_parser("sign", help="sign a bundle directory (again, after it changed)")
    s.add_argument("bundle")
    s.add_argument("--key", required=True, help="private key from `jishi keygen`")
    s.set_defaults(func=_sign)

    pk = sub.add_parser("pack", help="pack a bundle (or one of its adapters) into one .jishi archive")
    pk.add_argument("bundle")
    pk.add_argument("-o", "--output", required=True, help="archive to write (FILE.jishi)")
    pk.add_argument("--sign", metavar="KEY", help="sign with this private key first")
    pk.add_argument("--adapter", metavar="NAME",
                    help="pack only this adapter, for installing into the same model where the bundle already is")
    pk.set_defaults(func=_pack)

    v = sub.add_parser("verify", help="check every file's hash and the signature of a bundle or archive")
    v.add_argument("path", help="bundle directory or .jishi archive")
    v.add_argument("--key", help="public key the bundle must be signed with")
    v.set_defaults(func=_verify)

    ins = sub.add_parser("install", help="verify and install a .jishi archive (a bundle, or an adapter for an installed model)")
    ins.add_argument("path")
    ins.add_argument("--prefix", help="where installed models live (default: the user's data directory)")
    ins.add_argument("--key", help="public key the bundle must be signed with")
    ins.set_defaults(func=_install)

    ls = sub.add_parser("list", help="installed models")
    ls.add_argument("--prefix")
    ls.set_defaults(func=_list)

    rm = sub.add_parser("remove", help="remove an installed model")
    rm.add_argument("name")
    rm.add_argument("--prefix")
    rm.set_defaults(func=_remove)

    ad = sub.add_parser("adapter", help="add, list or remove the LoRA adapters of a bundle")
    ad_sub = ad.add_subparsers(title="actions", metavar="ACTION")
    a_add = ad_sub.add_parser("add", help="convert a PEFT adapter and add it to a bundle with merge points")
    a_add.add_argument("bundle")
    a_add.add_argument("adapter", metavar="NAME=DIR")
    a_add.set_defaults(func=_adapter_add)
    a_ls = ad_sub.add_parser("list", help="the bundle's adapters")
    a_ls.add_argument("bundle")
    a_ls.set_defaults(func=_adapter_list)
    a_rm = ad_sub.add_parser("remove", help="remove an adapter from a bundle")
    a_rm.add_argument("bundle")
    a_rm.add_argument("name")
    a_rm.set_defaults(func=_adapter_remove)

    d = sub.add_parser("devices", help="known device profiles; `jishi devices detect` describes this machine")
    d.add_argument("action", nargs="?", choices=["list", "detect"], default="list")
    d.set_defaults(func=_devices)

    pl = sub.add_parser("plan", help="estimate memory and speed of each quantization on a device")
    pl.add_argument("model", help="bundle, installed name, Hugging Face directory, GGUF file or known base")
    pl.add_argument("--device", default="detect", help="profile id (see `jishi devices`) or 'detect' (default)")
    pl.add_argument("--context", type=int, default=2048)
    pl.set_defaults(func=_plan)

    wh = sub.add_parser("wheelhouse", help="gather the runtime's wheels for an offline install on another machine")
    wh.add_argument("--platform", required=True, choices=["linux-aarch64", "linux-x86_64"])
    wh.add_argument("--python-version", default="3.11", help="the device's Python (default 3.11, as on Raspberry Pi OS)")
    wh.add_argument("-o", "--output", required=True)
    wh.set_defaults(func=_wheelhouse)

    sv = sub.add_parser("serve", help="serve a model to a classroom: OpenAI-compatible API and a chat page")
    sv.add_argument("bundle", help="bundle directory or installed model name")
    _serve_options(sv)
    sv.add_argument("--threads", type=int, help="CPU threads for the model (default: physical cores)")
    sv.add_argument("--context", type=int, help="context window (default: the bundle's)")
    sv.add_argument("--force", action="store_true", help="load even if the model seems too big for free memory")
    sv.add_argument("--verbose", action="store_true", help="say which onnxruntime settings were chosen, and why")
    sv.set_defaults(func=_serve)

    svc = sub.add_parser("service", help="start the server at boot (systemd)")
    svc_sub = svc.add_subparsers(title="actions", metavar="ACTION")
    si = svc_sub.add_parser("install", help="write and enable a systemd unit for `jishi serve` (prints it when not root)")
    si.add_argument("bundle", help="bundle directory or installed model name")
    _serve_options(si)
    si.add_argument("--threads", type=int)
    si.add_argument("--context", type=int)
    si.add_argument("--user", help="run the server as this user (default: the one calling, or SUDO_USER)")
    si.add_argument("--unit-dir", help="write the unit into this directory instead of enabling it")
    si.set_defaults(func=_service_install)

    i = sub.add_parser("info", help="summarise a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=_info)
    return p


def _distill_options(parser, group, with_init: bool = True) -> dict:
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


def _build(args) -> int:
    from jishi.devices.plan import plan
    from jishi.pipeline import build

    calibrated = args.calibrated or args.quant == "int4-gptq"
    if args.quant == "int4-gptq":
        args.quant = "int4"
    quant = args.quant or "int4"
    if args.device:
        profile = _profile_for(args.device)
        shape = _model_shape(args.base or "smollm2-135m-instruct")
        _, best, why = plan(shape, profile, args.context)
        if best is None:
            raise JishiError(f"{shape.name} with context {args.context} does not fit {profile.id}: {why}")
        if args.quant and args.quant != best.quant:
            print(f"note: the plan for {profile.id} recommends {best.quant}; building {args.quant} as asked", file=sys.stderr)
        quant = args.quant or best.quant
        print(f"plan for {profile.id}: {why}", file=sys.stderr)
    adapters = [_named_dir(a) for a in args.adapter]
    merge = None
    if args.merge:
        merge = next((a for a in adapters if a[0] == args.merge), None)
        if merge is None:
            raise JishiError(f"--merge {args.merge} needs the adapter given as --adapter {args.merge}=DIR")
        if len(adapters) > 1 or args.merge_points:
            raise JishiError("a merged bundle has no merge points, so it takes no other adapters: build it with "
                             "--adapter NAME=DIR --merge NAME only")
        adapters = []
    if calibrated and quant != "int4":
        raise JishiError(f"--calibrated applies to int4 only, not {quant}")
    base, teacher = args.base, None
    if args.distill:
        base, teacher, calibrated = _distill_for_build(args, quant, calibrated)
        if base is None:  # another process of a torchrun: rank 0 builds
            return 0
    else:
        given = [n for n, default in args.distill_defaults.items() if getattr(args, n) != default]
        if given:
            raise JishiError(f"--{given[0].replace('_', '-')} is a distillation option: add --distill to make a student "
                             "first, or use `jishi distill`")
    path = build(base, quant, args.output, args.name, args.context, evaluate=not args.no_eval,
                 merge_points=True if adapters else args.merge_points, merge=merge, calibrated=calibrated,
                 block=args.block, teacher=teacher, head_bits=int(args.head[3:]))
    if adapters:
        from jishi.export.adapters import add_adapter

        for name, directory in adapters:
            add_adapter(path, name, directory)
    print(path)
    return 0


def _distill_for_build(args, quant: str, calibrated: bool):
    """`build --distill`: the student first (resumable), then the build of it; returns (student dir, teacher,
    calibrated)."""
    from jishi.distill.base import load_base
    from jishi.distill.student import distill
    from jishi.pipeline import default_output

    if args.merge:
        raise JishiError("--merge and --distill do not go together: distil first, then fine-tune the student")
    from pathlib import Path

    from jishi.distill.student import read_record

    options, config = _distill_settings(args)
    teacher = load_base(args.base)
    size = f"L{args.layers}" if args.layers else f"k{args.keep_ratio:g}"
    args.name = args.name or f"{teacher.name}-{size}"
    args.output = args.output or str(default_output(args.name, quant))
    student = Path(args.student) if args.student else Path(args.output).with_name(Path(args.output).name + ".student")
    done = read_record(student) if student.is_dir() else None
    if args.resume and done and done["training"]["steps_done"] >= config.steps and done["teacher"]["sha256"] == teacher.source_sha256:
        print(f"{student} is already distilled ({config.steps} steps): building it", file=sys.stderr)
    elif distill(teacher, student, options, config) is None:
        return None, None, calibrated
    print(f"student: {student}", file=sys.stderr)
    # A student's weights lie on no 4-bit grid: int4 by GPTQ, unless QAT already put them on RTN's grid.
    return str(student), teacher, calibrated or (quant == "int4" and not args.qat)


def _named_dir(spec: str) -> tuple[str, str]:
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise JishiError(f"expected NAME=DIR, got {spec!r}")
    return name, directory


def _sampling(args) -> dict:
    return dict(
        adapter=args.adapter,
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _load(args):
    import jishi

    model = jishi.load(args.bundle, threads=args.threads, context=args.context, force=args.force)
    if getattr(args, "verbose", False):
        print(_settings_text(model.settings, model.engine.session.get_providers()), file=sys.stderr)
    return model


def _settings_text(settings, active: list[str] | None = None) -> str:
    rows = settings.describe()
    if active is not None:
        rows.append(("session providers", " > ".join(active)))
    if settings.why:
        rows.append(("why", settings.why))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = _load(args)
    if args.raw or not model.manifest.tokenizer.chat_template:
        stream = model.stream(prompt, **_sampling(args))
    else:
        stream = model.chat_stream([{"role": "user", "content": prompt}], **_sampling(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(args) -> int:
    from jishi.runtime.chat import Conversation

    model = _load(args)
    convo = Conversation(model, system=args.system, reserve=args.max_tokens)
    print(f"{model.name} ({model.manifest.graph.quantization['name']}, context {model.context}). "
          "Ctrl-C stops a reply, Ctrl-D or /exit leaves, /reset starts over.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            convo.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            stream = convo.send(text, **_sampling(args))
        except JishiError as e:  # e.g. a message too long for the context: say so, keep chatting
            print(f"jishi: {e}", file=sys.stderr)
            continue
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()


def _finetune(args) -> int:
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
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(w)}  {v}" for k, v in rows))
    print(f"Wrote {res.output}; add it with `jishi adapter add BUNDLE {args.name or res.output.name}={res.output}`")
    return 0


def _distill(args) -> int:
    from jishi.distill.student import distill

    options, config = _distill_settings(args)
    out = distill(args.base, args.output, options, config)
    if out is not None:
        print(out)
    return 0


DISTILL_LR = 2e-4
QAT_LR = 1e-3  # measured: 40 QAT steps of the 20-block student reach held-out KL 0.77 at 1e-3, 1.21 at 1e-4


def _distill_settings(args):
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


def _eval(args) -> int:
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
    text = None
    if args.data:
        try:
            text = Path(args.data).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise JishiError(f"cannot read {args.data}: {e}") from None
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


def _serve_options(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the local network)")
    p.add_argument("--port", type=int, default=8080, help="default 8080")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $JISHI_API_KEY, or none)")
    p.add_argument("--max-concurrent", type=int, default=4, help="answers generated at once (default 4)")
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                   help="decode the answers in progress together, one model run per adapter (default); "
                        "--no-batch runs each answer on its own")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a slot; more get HTTP 429 (default 16)")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length when a request does not say (default 512)")
    p.add_argument("--system-prompt", help="system prompt for chats that bring none")
    p.add_argument("--adapter-system", action="append", default=[], metavar="NAME=TEXT",
                   help="system prompt for chats with this adapter (default: the adapter's own, else --system-prompt)")


def _serve_config(args):
    from jishi.runtime.server.app import ServerConfig

    for name in ("max_concurrent", "max_tokens", "port"):
        if getattr(args, name) < 1:
            raise JishiError(f"--{name.replace('_', '-')} must be at least 1")
    if args.queue < 0:
        raise JishiError("--queue must be 0 or more")
    systems = {}
    for spec in args.adapter_system:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise JishiError(f"expected --adapter-system NAME=TEXT, got {spec!r}")
        systems[name] = text
    return ServerConfig(api_key=args.api_key or os.environ.get("JISHI_API_KEY") or None,
                        max_concurrent=args.max_concurrent, queue=args.queue, system_prompt=args.system_prompt,
                        adapter_system=systems, max_tokens=args.max_tokens, batch=args.batch)


def _serve(args) -> int:
    from jishi.runtime.server import require_serve_extra, serve

    require_serve_extra()  # before loading the model: say what to install at once
    config = _serve_config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone on the network can use this server "
              "(pass --api-key KEY to require one)", file=sys.stderr)
    serve(_load(args), args.host, args.port, config)
    return 0


def _service_install(args) -> int:
    from jishi.runtime.server.service import install_service

    _serve_config(args)  # the same checks as `jishi serve`, now rather than at boot
    serve_args = ["--host", args.host, "--port", str(args.port), "--max-concurrent", str(args.max_concurrent),
                  "--queue", str(args.queue), "--max-tokens", str(args.max_tokens)]
    if not args.batch:
        serve_args.append("--no-batch")
    if args.api_key:  # the unit is then written readable by root only
        serve_args += ["--api-key", args.api_key]
    if args.system_prompt:
        serve_args += ["--system-prompt", args.system_prompt]
    for spec in args.adapter_system:
        serve_args += ["--adapter-system", spec]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    if args.context:
        serve_args += ["--context", str(args.context)]
    install_service(args.bundle, serve_args, unit_dir=args.unit_dir, user=args.user)
    return 0


def _adapter_add(args) -> int:
    from jishi.export.adapters import add_adapter

    name, directory = _named_dir(args.adapter)
    out = add_adapter(args.bundle, name, directory)
    print(f"added {name} ({out.stat().st_size / 1e6:.1f} MB); the bundle's signature, if any, was removed: sign it again")
    return 0


def _adapter_list(args) -> int:
    from jishi.runtime.bundle import open_bundle

    m = open_bundle(args.bundle).manifest
    if not m.adapters:
        print("no adapters" + ("" if m.merge_points else " (and no merge points: build with --merge-points)"))
        return 0
    print(_table(["name", "rank", "alpha", "targets", "file"],
                 [[a["name"], str(a["rank"]), str(a.get("alpha")), ",".join(a["targets"]), a["file"]] for a in m.adapters]))
    return 0


def _adapter_remove(args) -> int:
    from jishi.export.adapters import remove_adapter

    remove_adapter(args.bundle, args.name)
    print(f"removed {args.name}")
    return 0


def _keygen(args) -> int:
    from jishi.export.signing import keygen

    private, public = keygen(args.output)
    print(f"private key: {private} (keep it secret)\npublic key:  {public} (copy it to the devices)")
    return 0


def _sign(args) -> int:
    from jishi.export.signing import sign_bundle

    print(sign_bundle(args.bundle, args.key))
    return 0


def _pack(args) -> int:
    from jishi.export.pack import pack_adapter, pack_bundle

    if args.adapter:
        out = pack_adapter(args.bundle, args.adapter, args.output, sign_key=args.sign)
    else:
        out = pack_bundle(args.bundle, args.output, sign_key=args.sign)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _verify(args) -> int:
    import tempfile
    from pathlib import Path

    from jishi.runtime.adapter_delivery import ADAPTER_MANIFEST, read_adapter_dir
    from jishi.runtime.archive import unpack
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.manifest import MANIFEST

    path = Path(args.path)
    with tempfile.TemporaryDirectory(prefix="jishi-verify-") as tmp:
        if path.is_file():
            unpack(path, Path(tmp))
            path = Path(tmp)
        if (path / ADAPTER_MANIFEST).is_file() and not (path / MANIFEST).exists():
            am, _, signed = read_adapter_dir(path, key=args.key)
            what = (f"adapter {am.name} for {am.bundle}: rank {am.adapter['rank']}, {','.join(am.adapter['targets'])}, "
                    f"{sum(f.size for f in am.files.values()) / 1e6:.1f} MB")
            count = ""
        else:
            bundle = open_bundle(path, key=args.key)
            signed, what = bundle.signed, bundle.manifest.name
            count = f"{len(bundle.manifest.files)} files, {bundle.size / 1e6:.1f} MB, "
        if args.key:
            sig = f"signature valid ({Path(args.key).name})"
        else:
            sig = "signed (signature not checked: pass --key)" if signed else "not signed"
        print(f"OK  {what}: {count}every sha256 matches; {sig}")
    return 0


def _install(args) -> int:
    from jishi.runtime.store import install

    path = install(args.path, prefix=args.prefix, key=args.key)
    if not args.key:
        print("warning: installed without checking a signature (pass --key PUB to require one)", file=sys.stderr)
    from jishi.runtime.bundle import open_bundle

    adapters = [a["name"] for a in open_bundle(path, verify_hashes=False).manifest.adapters]
    print(f"installed {path.name.split('@')[0]} → {path}" + (f" (adapters: {', '.join(adapters)})" if adapters else ""))
    return 0


def _list(args) -> int:
    from jishi.runtime.store import list_installed, models_dir

    rows = list_installed(args.prefix)
    if not rows:
        print(f"no models installed in {models_dir(args.prefix)}")
        return 0
    print(_table(["name", "quant", "size", "signed", "adapters", "path"],
                 [[r.name, r.quantization, f"{r.size / 1e6:.1f} MB", "yes" if r.signed else "no",
                   ", ".join(r.adapters) or "-", str(r.path)] for r in rows]))
    return 0


def _remove(args) -> int:
    from jishi.runtime.store import remove

    print(f"removed {remove(args.name, args.prefix)}")
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _devices(args) -> int:
    from jishi.devices.detect import best_profile, detect
    from jishi.devices.profiles import load_profiles

    if args.action == "detect":
        machine = detect()
        rows = machine.describe()
        match = best_profile(machine)
        rows.append(("closest profile", f"{match.id} ({match.name})" if match else "none of this architecture"))
        w = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
        from jishi.runtime.settings import choose

        print("\nruntime settings (onnxruntime):")
        print("\n".join("  " + line for line in _settings_text(choose(match, machine.cores)).splitlines()))
        return 0
    rows = [[p.id, p.arch, str(p.cores), f"{p.ram_gb:g} GB", f"{p.bandwidth_gbs:.0f} GB/s", ", ".join(p.isa), p.name]
            for p in load_profiles()]
    print(_table(["id", "arch", "cores", "RAM", "bandwidth", "ISA", "device"], rows))
    return 0


def _model_shape(spec: str):
    import json as _json
    from pathlib import Path

    from jishi.devices.plan import ModelShape
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.model import resolve_bundle

    path = Path(spec)
    if (path / "config.json").is_file():
        c = _json.loads((path / "config.json").read_text())
        heads = c["num_attention_heads"]
        return ModelShape(path.name, c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                          c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads,
                          c["vocab_size"], bool(c.get("tie_word_embeddings", False)))
    if path.suffix == ".gguf" or (not path.exists() and spec.lower() in _known_bases()):
        from jishi.distill.base import load_config_only

        return load_config_only(spec)
    m = open_bundle(resolve_bundle(spec), verify_hashes=False).manifest
    return ModelShape.from_config(m.name, m.config)


def _known_bases():
    try:
        from jishi.distill.base import KNOWN_BASES
    except ImportError:
        return {}
    return KNOWN_BASES


def _profile_for(device: str):
    from jishi.devices.detect import best_profile, detect
    from jishi.devices.profiles import get_profile

    if device != "detect":
        return get_profile(device)
    profile = best_profile(detect())
    if profile is None:
        raise JishiError("no device profile matches this machine; pass --device (see `jishi devices`)")
    return profile


def _plan(args) -> int:
    from jishi.devices.plan import plan

    profile = _profile_for(args.device)
    shape = _model_shape(args.model)
    rows, best, why = plan(shape, profile, args.context)
    print(f"{shape.name} on {profile.name} ({profile.id}): {profile.ram_gb:g} GB, "
          f"{profile.bandwidth_gbs:.0f} GB/s, context {args.context}\n")
    table = [[r.quant, f"{r.weights_bytes / 2**20:.0f} MB", f"{r.kv_bytes / 2**20:.0f} MB", f"{r.memory_bytes / 2**20:.0f} MB",
              f"{r.tokens_per_s:.0f}", "yes" if r.fits else "NO"] for r in rows]
    print(_table(["quant", "weights", "KV cache", "total", "decode tok/s", "fits"], table))
    print(f"\nrecommended: {why}" if best else f"\n{why}")
    return 0 if best else 1


def _wheelhouse(args) -> int:
    from jishi.wheelhouse import build_wheelhouse

    wheels = build_wheelhouse(args.output, args.platform, args.python_version)
    size = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"{len(wheels)} wheels ({size:.0f} MB) in {args.output}; on the device:\n"
          f"  pip install --no-index --find-links {args.output} jishi")
    return 0


def _info(args) -> int:
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.model import resolve_bundle

    bundle = open_bundle(resolve_bundle(args.bundle))
    if args.json:
        print(bundle.manifest_bytes.decode())
        return 0
    print(describe(bundle))
    return 0


def describe(bundle) -> str:
    m = bundle.manifest
    c = m.config
    q = m.graph.quantization
    rows = [
        ("name", m.name),
        ("path", str(bundle.root)),
        ("format", f"{m.format} v{m.format_version}"),
        ("size", f"{bundle.size / 1e6:.1f} MB in {len(m.files)} files"),
        ("model", f"{c.family}, {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads "
                  f"({c.num_kv_heads} KV), vocab {c.vocab_size}"),
        ("quantization", ", ".join(f"{k}={v}" for k, v in q.items())),
        ("context", f"{c.context_length} tokens"),
        ("base", f"{m.provenance.get('base')} ({m.provenance.get('base_source')}, sha256 "
                 f"{(m.provenance.get('base_sha256') or '-')[:12]})"),
        ("signed", "yes" if bundle.signed else "no"),
        ("merge points", (f"{', '.join(m.merge_points['targets'])}, any rank"
                          + (f" (in {m.merge_points['graph']}, opened when an adapter is used)" if m.merge_points.get("graph") else ""))
                         if m.merge_points else "none (built with --no-merge-points)"),
        ("adapters", ", ".join(a["name"] + (" (delivered)" if a.get("delivered") else "") for a in m.adapters) or "none"),
    ]
    d = m.provenance.get("distilled")
    if d:
        teacher, plan = d.get("teacher") or {}, d.get("plan") or {}
        rows.append(("distilled", f"from {teacher.get('name', '?')}: {len(plan.get('layers', []))} of {teacher.get('layers', '?')} "
                                  f"blocks, {d.get('steps')} steps on {d.get('tokens') or 0:,} tokens"
                                  + (", int4-aware (QAT)" if d.get("qat") else "")))
    from jishi.runtime.settings import for_this_machine

    s = for_this_machine()
    rows.append(("runtime here", f"{s.threads} threads, {' > '.join(s.providers)}, arena {'on' if s.cpu_mem_arena else 'off'}, "
                                 f"prepacking {'on' if s.prepacking else 'off'}, spinning {'on' if s.spinning else 'off'} "
                                 f"({'profile ' + s.profile if s.profile else 'defaults'})"))
    ev = m.evaluation
    if ev:
        rows.append(("quality", f"perplexity {ev['perplexity']:.2f} (reference {ev['reference_perplexity']:.2f}, "
                                f"{100 * (ev['perplexity'] / ev['reference_perplexity'] - 1):+.1f}%), "
                                f"top-1 agreement {100 * ev['top1_agreement']:.1f}%"))
        rows.append(("measured on", ev["heldout"]))
        vt = ev.get("teacher")
        if vt:
            rows.append(("vs teacher", f"{vt['name']}: perplexity {vt['student_perplexity']:.2f} against its "
                                       f"{vt['perplexity']:.2f} ({vt['student_perplexity'] / vt['perplexity']:.2f}x), top-1 "
                                       f"agreement {100 * vt['top1_agreement']:.1f}%, KL {vt['kl']:.3f} nats/token"))
        mg = ev.get("merged")
        if mg:
            rows.append(("merged", f"adapter {m.provenance.get('merged_adapter', {}).get('name')} folded into the weights; "
                                   + ", ".join(f"{q} perplexity {mg[q]['perplexity']:.2f} ({100 * mg[q]['loss']:+.1f}%, "
                                               f"{mg[q]['size_mb']:.0f} MB)" for q in ("int4", "int8"))))
            rebuild = "" if mg["recommended"] == q.get("name") else f" (rebuild with --quant {mg['recommended']})"
            rows.append(("recommended", f"{mg['recommended']}{rebuild}: {mg['reason']}"))
    else:
        rows.append(("quality", "not measured (built with --no-eval)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("files:")
    fw = max(len(n) for n in m.files)
    for n, f in m.files.items():
        lines.append(f"  {n:<{fw}}  {f.size / 1e6:9.2f} MB  sha256 {f.sha256[:16]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
