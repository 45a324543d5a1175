"""Settings combinations of the regularizers that cannot work, refused before any model is loaded."""

from __future__ import annotations

from ..config import JobConfig
from ..errors import ConfigError
from .dop import preservation_caption


def check_regularizers(cfg: JobConfig) -> None:
    """Raise :class:`ConfigError` for ``advanced`` settings that cannot work with the rest of ``cfg``.

    DOP needs a trigger word, and its class word must not contain the trigger (the preservation prompt would then
    still carry it). Every text-encoder mode works with DOP: ``cache`` and ``unload`` encode the preservation
    prompts up front with the training captions (in ``unload`` mode that is the class word alone), ``live``
    encodes them each step. Differential guidance and EMA combine with everything.
    """
    adv = cfg.advanced
    if not adv.dop:
        return
    trigger = (cfg.trigger_word or "").strip()
    if not trigger:
        raise ConfigError(
            "advanced.dop needs trigger_word: DOP builds each step's preservation prompt by replacing the trigger word "
            f"in the caption with advanced.dop_class ({adv.dop_class!r}) - set trigger_word (and use it in the "
            "captions via [trigger] or the datasets' prepend_trigger), or set advanced.dop to false"
        )
    if preservation_caption(adv.dop_class, trigger, adv.dop_class) is not None:
        raise ConfigError(
            f"advanced.dop_class {adv.dop_class!r} contains trigger_word {trigger!r}: the preservation prompt would "
            "still carry the trigger - use a plain class word such as 'person' or 'scene' that differs from the trigger"
        )
