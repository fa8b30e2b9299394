"""The one helper that phrases "unknown X" errors for every registry in attnzoo.

Attention names, layer options, kernel backends, data sets and config groups all fail the same way: the message
names the kind of thing, repeats the user's spelling, suggests the closest valid spelling and lists them all.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown(kind: str, got: object, valid: Iterable[str]) -> str:
    """Return ``unknown <kind> '<got>'. Did you mean '<close>'? Valid: a, b, c.``"""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(got), valid, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {got!r}.{hint} Valid: {', '.join(valid)}."
