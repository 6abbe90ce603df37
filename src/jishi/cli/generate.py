"""`jishi run` (one prompt, streamed) and `jishi chat` (a conversation in the terminal)."""

from __future__ import annotations

import sys

from jishi.errors import JishiError

from .common import add_load_options, load_model


def register(sub) -> None:
    for name, help_text in (("run", "answer one prompt, streaming"), ("chat", "chat in the terminal")):
        r = sub.add_parser(name, help=help_text)
        r.add_argument("bundle", help="bundle directory or installed model name")
        if name == "run":
            r.add_argument("prompt", help="the prompt ('-' reads standard input)")
            r.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
            shape = r.add_mutually_exclusive_group()
            shape.add_argument("--json-schema", metavar="FILE",
                               help="the answer is JSON that validates against this JSON Schema file")
            shape.add_argument("--json", action="store_true", help="the answer is a JSON object")
            shape.add_argument("--regex", help="the answer matches this regular expression")
            shape.add_argument("--grammar", metavar="FILE", help="the answer follows this Lark grammar file")
        else:
            r.add_argument("--system", help="system prompt")
        # Unset values are the model's defaults (`jishi defaults BUNDLE` shows them).
        r.add_argument("--max-tokens", type=int, help="most new tokens per answer (default: the model's, else 256)")
        r.add_argument("--temperature", type=float, help="0 is plain greedy (default: the model's, else 0.7)")
        r.add_argument("--top-k", type=int, help="default: the model's, else 40")
        r.add_argument("--top-p", type=float, help="default: the model's, else 0.95")
        r.add_argument("--repetition-penalty", type=float,
                       help="applies when sampling (default: the model's, else 1.1)")
        r.add_argument("--min-p", type=float,
                       help="drop tokens below this share of the likeliest token's probability (default 0: off)")
        r.add_argument("--seed", type=int)
        r.add_argument("--adapter", help="use this adapter of the bundle (see `jishi adapter list`)")
        r.add_argument("--template-var", action="append", default=[], metavar="NAME=VALUE",
                       help="a variable for the chat template, e.g. enable_thinking=false for Qwen3 (repeatable; "
                            "VALUE is read as JSON where it is JSON, else as text)")
        add_load_options(r)
        r.set_defaults(func=run if name == "run" else chat)


def template_vars(args) -> dict:
    import json

    out = {}
    for item in args.template_var:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise JishiError(f"--template-var {item!r}: write NAME=VALUE, e.g. enable_thinking=false")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def sampling(args) -> dict:
    return dict(
        adapter=args.adapter,
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        min_p=args.min_p,
        seed=args.seed,
    )


def constraint(args) -> dict:
    """The constraint `jishi run` was given, as generate()'s keyword arguments."""
    from pathlib import Path

    def read(path: str, what: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise JishiError(f"cannot read the {what} {path}: {e.strerror}") from None

    if args.json_schema:
        return {"schema": read(args.json_schema, "JSON schema file")}
    if args.grammar:
        return {"grammar": read(args.grammar, "grammar file")}
    if args.regex:
        return {"regex": args.regex}
    if args.json:
        return {"json_object": True}
    return {}


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    shape = constraint(args)
    model = load_model(args)
    if args.raw or not model.manifest.tokenizer.chat_template:
        stream = model.stream(prompt, **sampling(args), **shape)
    else:
        stream = model.chat_stream([{"role": "user", "content": prompt}], template_vars(args), **sampling(args), **shape)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and stream.result.speculation:
        s = stream.result.speculation
        print(f"speculation: {s['accepted']} of {s['drafted']} guessed tokens kept ({s['acceptance']:.0%}); "
              f"{s['verify_runs']} checking runs and {s['steps']} single steps for {stream.result.completion_tokens} tokens",
              file=sys.stderr)
    return 0


def chat(args) -> int:
    from jishi.runtime.chat import Conversation

    model = load_model(args)
    if not model.manifest.tokenizer.chat_template:
        from jishi.runtime.tokenizer import NO_TEMPLATE

        raise JishiError(NO_TEMPLATE)
    convo = Conversation(model, system=args.system, reserve=args.max_tokens or model.defaults.max_tokens or 256,
                         template_vars=template_vars(args))
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
            stream = convo.send(text, **sampling(args))
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
