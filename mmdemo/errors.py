"""Errors whose message is shown to the user verbatim."""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file or setting and the fix.

    The UI shows it as-is (as a ``gr.Error``) and the CLI prints it and exits non-zero,
    so it must never carry a traceback, a token or a path outside the user's workspace.
    """
