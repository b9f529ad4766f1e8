"""The base of every error that is the user's to fix (bad params, prompts, models, stores).

Stages and the CLI turn these into one clear message and a non-zero exit, with no
traceback; anything else is a bug and keeps its traceback.
"""


class RefusalAtlasError(Exception):
    """An input problem with a message that says what, where, and how to fix it."""
