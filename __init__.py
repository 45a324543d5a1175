"""ComfyUI entry point of the Wan 2.2 LoRA trainer pack (classic V1 node mappings).

ComfyUI imports this folder as a package under whatever name it was cloned as; the nodes live in the relative
subpackage ``.nodes`` (never ``import nodes``: that is ComfyUI's own module) and use ``trainer_core``, installed
with ``pip install -e`` into ComfyUI's Python.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
