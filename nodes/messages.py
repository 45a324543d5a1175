"""Error messages in the words of the graph: the core names settings as a job file does (``memory.offload_blocks``,
``datasets[0].prepend_trigger``, ``'name'``); in ComfyUI each is a widget of some node. Every pack node's function
is wrapped so that the settings its errors name read as ``offload_blocks (Load Wan22 Experts)``, or just
``offload_blocks`` on the node that raised it (a setting the node has a widget for is named as its own widget). A
node's ``WORDS`` rename what its own section's errors call a setting whose widget is named otherwise (Quantize ARA's
``ara_source`` is its adapter / adapter_path). (VALIDATE_INPUTS is not wrapped: ComfyUI reads its parameters, and its
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
_SETTING = re.compile(
    r"(?<![\w./\[\]])(datasets\[(\d*)\](?:\.(\w+))?|[a-z_]+\.[a-z_0-9]+(?:\.\d)?|'(name)')(?![\w/])"
)
#: Train LoRA's distributed flags are one choice of Configure Hardware's gpu_placement: turning a flag off is
#: choosing 'data parallel' (the flag then reads as its choice through the labels).
_FLAG_OFF = re.compile(r"set distributed\.(?:expert_groups|shard_experts): false")
#: The labels of every pack node's widgets, filled when the nodes register (``nodes/__init__.py``): for text that is
#: not an error but names settings too (Train LoRA's warnings).
LABELS: dict[str, tuple[str, str]] = {}


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


def in_widget_terms(
    message: str, labels: dict[str, tuple[str, str]], node: str = "", own: dict[str, str] | None = None
) -> str:
    """``message`` (raised by the node titled ``node``, whose widgets are ``own``: setting path -> widget) with every
    setting ``labels`` knows named as its widget; the widget's node is added unless it is ``node`` or the message
    begins with its title. ``datasets[i]`` alone names Build Video Dataset #i+1, ``datasets[].key`` its widget."""
    own = own or {}
    message = _FLAG_OFF.sub("set distributed.placement to 'data parallel'", message)

    def label(match: re.Match) -> str:
        whole, index, key, top = match.groups()
        if index is not None and key is None:
            path = "datasets.folder"  # the dataset as a whole: its node
        else:
            path = f"datasets.{key}" if index is not None else top or whole
        if path in own and index is None:  # an indexed dataset may be another node of the chain
            return f"'{own[path]}'" if top else own[path]
        if path not in labels:
            return whole
        widget, title = labels[path]
        if index:
            title = f"{title} #{int(index) + 1}"
        if index is not None and key is None:
            return title
        named = widget if title == node or message.startswith(title) else f"{widget} ({title})"
        return f"'{named}'" if top else named

    return _SETTING.sub(label, message)


def _reworded(message: str, words: dict[str, str]) -> str:
    """``message`` with each of ``words`` (as a whole word, longest first) replaced by its widget text."""
    for word in sorted(words, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.]){re.escape(word)}(?![\w\[])", words[word], message)
    return message


def speaking_widgets(
    fn: Callable[..., Any], labels: dict[str, tuple[str, str]], node: str, fields: dict[str, str] | None = None,
    words: dict[str, str] | None = None,
) -> Callable[..., Any]:
    """``fn``, the function of the node titled ``node`` (its widgets: ``fields``, widget -> setting path; its
    ``words``: see the module), whose trainer errors name widgets, not settings."""
    own = {path: widget for widget, path in (fields or {}).items()}

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except TrainerError as exc:
            text = in_widget_terms(_reworded(str(exc), words or {}), labels, node, own)
            exc.args = (text, *exc.args[1:])
            raise
        return out

    return wrapped
