"""The one error hierarchy of jishi.

Every folder may import this module: it depends on the standard library only.
Each message says what went wrong and what to do about it; the CLI prints the
message without a traceback (``--debug`` shows it).
"""


class JishiError(Exception):
    """Base class of every error jishi raises on purpose."""


class BundleError(JishiError):
    """A bundle is missing, malformed, tampered with or of an unknown version."""


class SignatureError(BundleError):
    """A bundle's signature is missing, invalid or made with another key."""


class AdapterError(JishiError):
    """An adapter does not fit the bundle, or its file is corrupt."""


class ContextLengthError(JishiError):
    """A prompt (plus the tokens asked for) does not fit in the context window."""


class DeviceFitError(JishiError):
    """A model does not fit the device's memory."""


class BaseModelError(JishiError):
    """A base model cannot be found, fetched or loaded."""


class MissingExtraError(JishiError):
    """A feature needs an optional dependency group that is not installed."""

    def __init__(self, extra: str, what: str):
        super().__init__(
            f"{what} needs the [{extra}] extra, which is not installed: "
            f"pip install 'jishi[{extra}]'"
        )
        self.extra = extra


class ConstraintError(JishiError):
    """A JSON schema, regex or grammar that the constrained decoder cannot compile."""
