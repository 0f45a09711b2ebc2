"""lorakit's ComfyUI custom nodes: link or copy this folder into ``ComfyUI/custom_nodes/`` and install lorakit
into ComfyUI's Python environment (see the README's "ComfyUI nodes" section)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
