"""Errors the user sees as one line: what is wrong and what to do about it."""


class RewriteError(Exception):
    """A problem with the input or the options. The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class UnsupportedModel(RewriteError):
    """The graph is understood, but the runtime cannot run it (soft-capping, interleaved RoPE, ...)."""


class PatternMismatch(RewriteError):
    """Some layer did not match the pattern library; the message names the layer and the check."""


class VerifyFailed(RewriteError):
    """The rewritten graph does not compute what the reference computes."""

    exit_code = 1
