"""Small pieces the command groups share: tables, NAME=DIR specs, loading a model with the CLI's options."""

from __future__ import annotations

import sys

from jishi.errors import JishiError


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def key_values(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def named_dir(spec: str) -> tuple[str, str]:
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise JishiError(f"expected NAME=DIR, got {spec!r}")
    return name, directory


def settings_text(settings, active: list[str] | None = None) -> str:
    rows = settings.describe()
    if active is not None:
        rows.append(("session providers", " > ".join(active)))
    if settings.why:
        rows.append(("why", settings.why))
    return key_values(rows)


def load_model(args):
    """``jishi.load`` with the command's --threads/--context/--force; --verbose says what was chosen."""
    import jishi

    template = None
    if getattr(args, "chat_template", None):
        template = read_template(args.chat_template)
    model = jishi.load(args.bundle, threads=args.threads, context=args.context, force=args.force, chat_template=template,
                       draft=getattr(args, "draft", None), speculation=getattr(args, "speculation", None))
    if getattr(args, "verbose", False):
        print(settings_text(model.settings, model.engine.session.get_providers()), file=sys.stderr)
    return model


def add_load_options(p) -> None:
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--context", type=int, help="context window (default: the bundle's)")
    p.add_argument("--force", action="store_true", help="load even if the model seems too big for free memory")
    p.add_argument("--verbose", action="store_true", help="say which onnxruntime settings were chosen, and why")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template (Hugging Face style) to use instead of the bundle's, or for a bundle "
                        "of a pretrained base that has none")
    add_speculation_options(p)


def add_speculation_options(p) -> None:
    p.add_argument("--speculation", choices=("lookup", "draft", "off"),
                   help="guess tokens ahead and check them in one run (same tokens, faster): lookup (default) "
                        "guesses from the text so far, draft from --draft; off decodes a token a run")
    p.add_argument("--draft", metavar="BUNDLE",
                   help="a smaller bundle with the same tokenizer (e.g. a distilled student) that writes the guesses")


def read_template(path: str) -> str:
    """The text of a chat template file, or a JishiError that says what is wrong with it."""
    from pathlib import Path

    from jishi.errors import JishiError

    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JishiError(f"cannot read the chat template {p}: {e}") from None
    if not text.strip():
        raise JishiError(f"the chat template {p} is empty")
    return text


def read_text_file(path: str, what: str) -> str:
    """The UTF-8 text of a file named on the command line, or a JishiError naming it and why."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JishiError(f"cannot read {what} {path}: {e}") from None
