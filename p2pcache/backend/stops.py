"""Stop strings: where a completion's text ends. One rule for the decode loop, live
streaming and verification, so a streamed, a stored and a verified answer cut alike."""

from __future__ import annotations

from collections.abc import Sequence


def stop_cut(text: str, stops: Sequence[str], new_from: int = 0) -> int:
    """Index of the earliest stop string in ``text``, or -1 when there is none.

    ``new_from``: the text before it was searched already, so only occurrences ending at or
    after it are looked for (a streaming caller searches each new piece once). An earlier
    occurrence found anyway is still the answer: the earliest start wins."""
    return min(
        (i for s in stops if (i := text.find(s, max(0, new_from - len(s) + 1))) >= 0),
        default=-1,
    )
