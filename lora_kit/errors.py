"""User-facing errors: one line, naming the file, record and field; the CLI prints them without a traceback.

Everything a user can get wrong (bad recipe key, malformed data, mismatched adapter) raises `LorakitError`.
"""


class LorakitError(Exception):
    """A mistake in the user's input. The message is shown as is, on one line."""


def where(path, record=None, field=None) -> str:
    """`file:record: field` prefix used by every data and recipe error."""
    out = str(path)
    if record is not None:
        out += f":{record}"
    if field is not None:
        out += f": field '{field}'"
    return out
