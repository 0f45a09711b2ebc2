"""LoRA formats: detection, reading into the internal model, writing."""

from lorakit.formats.emit import EmitResult, emit, fold_scale, fuse, restrict
from lorakit.formats.parse import Detection, ModuleEntry, ParsedLora, detect, load, parse, read_lora
from lorakit.formats.spec import FORMATS, WRITABLE, FormatSpec, formats, get_format, register_format

__all__ = ["EmitResult", "emit", "fold_scale", "fuse", "restrict", "Detection", "ModuleEntry", "ParsedLora",
           "detect", "load", "parse", "read_lora", "FORMATS", "WRITABLE", "FormatSpec", "formats", "get_format",
           "register_format"]
