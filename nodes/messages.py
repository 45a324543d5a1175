"""Error messages in the words of the graph: the core names settings as a job file does (``memory.offload_blocks``,
``datasets[0].prepend_trigger``, ``'name'``); in ComfyUI each is a widget of some node. Every pack node's function
is wrapped so that the settings its errors name read as ``offload_blocks (Load Wan22 Experts)``, or just
``offload_blocks`` on the node that raised it. (VALIDATE_INPUTS is not wrapped: ComfyUI reads its parameters, and its
messages are written in widget terms.)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from trainer_core.errors import TrainerError

#: A job-file setting inside a message: ``section.key`` (``.N`` for a list item), ``datasets[i].key`` or a quoted
#: top-level key.
_SETTING = re.compile(r"(?<![\w./\[\]])(datasets\[(\d+)\]\.(\w+)|[a-z_]+\.[a-z_0-9]+(?:\.\d)?|'(name)')(?![\w/])")


def widget_labels(nodes: dict[str, tuple[str, dict[str, str]]]) -> dict[str, tuple[str, str]]:
    """``{setting path: (widget, node title)}`` from ``{title: (node id, {widget: setting path})}``; a setting two
    nodes set keeps the first node's widget (list the nodes that feed Train LoRA first)."""
    labels: dict[str, tuple[str, str]] = {}
    for title, (_, fields) in nodes.items():
        for widget, path in fields.items():
            labels.setdefault(path, (widget, title))
            if path.startswith("optimizer.betas."):  # the pair is validated as a whole
                labels.setdefault("optimizer.betas", ("adam_beta1 / adam_beta2", title))
    return labels


def in_widget_terms(message: str, labels: dict[str, tuple[str, str]], node: str = "") -> str:
    """``message`` (raised by the node titled ``node``) with every setting ``labels`` knows named as its widget; the
    widget's node is added unless it is ``node`` or the message begins with its title."""

    def label(match: re.Match) -> str:
        whole, index, key, top = match.groups()
        path = f"datasets.{key}" if index is not None else top or whole
        if path not in labels:
            return whole
        widget, title = labels[path]
        if index is not None:
            title = f"{title} #{int(index) + 1}"
        named = widget if title == node or message.startswith(title) else f"{widget} ({title})"
        return f"'{named}'" if top else named

    return _SETTING.sub(label, message)


def speaking_widgets(fn: Callable[..., Any], labels: dict[str, tuple[str, str]], node: str) -> Callable[..., Any]:
    """``fn``, the function of the node titled ``node``, whose trainer errors name widgets, not settings."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except TrainerError as exc:
            exc.args = (in_widget_terms(str(exc), labels, node), *exc.args[1:])
            raise
        return out

    return wrapped
