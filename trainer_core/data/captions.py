"""Caption rules (pure functions).

Order: the caption file's text (or the dataset's default caption when there is no file) has its whitespace
collapsed to single spaces, every ``[trigger]`` is replaced by the trigger word, and, when asked, the trigger word is
put in front of captions that do not already contain it (``"<trigger>, <caption>"``, or ``"<trigger> <caption>"``
with the separator ``" "``, as ai-toolkit joins them): as a whole word, or with ``match="substring"`` anywhere, even
inside a longer word, as ai-toolkit counts it. Caption dropout, which happens per
sample at training time, replaces the result with ``""``.
"""

from __future__ import annotations

import re
from typing import Literal

#: Placeholder replaced by the job's trigger word.
TRIGGER_TOKEN = "[trigger]"


def normalize_caption(text: str) -> str:
    """Collapse runs of whitespace (newlines included) into single spaces and strip the ends."""
    return " ".join(text.split())


def contains_word(caption: str, word: str) -> bool:
    """Whether ``word`` appears in ``caption`` as a whole word (not inside a longer word), case-sensitively."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", caption) is not None


def apply_trigger(caption: str, trigger: str | None, prepend: bool, separator: str = ", ",
                  match: Literal["word", "substring"] = "word") -> str:
    """Replace ``[trigger]`` and optionally prepend the trigger word, joined to the caption by ``separator``, unless
    the caption holds it already (``match``: as a whole word, or as any substring).

    Raises ``ValueError`` when the caption needs a trigger word (it contains ``[trigger]`` or ``prepend`` is on)
    but ``trigger`` is ``None``; the caller turns that into an error naming the file or setting.
    """
    if TRIGGER_TOKEN in caption:
        if trigger is None:
            raise ValueError(f"the caption contains {TRIGGER_TOKEN} but no trigger word is set")
        caption = caption.replace(TRIGGER_TOKEN, trigger)
    if prepend:
        if trigger is None:
            raise ValueError("prepend_trigger is on but no trigger word is set")
        if not (trigger in caption if match == "substring" else contains_word(caption, trigger)):
            caption = f"{trigger}{separator}{caption}" if caption else trigger
    return caption


def dropout_caption(caption: str, rate: float, u: float) -> str:
    """``""`` when the uniform draw ``u`` in [0, 1) falls below ``rate``, else ``caption`` unchanged."""
    return "" if u < rate else caption
