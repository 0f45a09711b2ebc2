"""Reading and writing weight files."""

from lorakit.io.header import TensorInfo
from lorakit.io.reader import PickleFile, SafetensorsFile, ShardedFile, WeightFile, open_weights
from lorakit.io.writer import SafetensorsWriter, check_output_path, data_section_sha256, save_tensors, tensor_bytes

__all__ = ["TensorInfo", "WeightFile", "SafetensorsFile", "ShardedFile", "PickleFile", "open_weights",
           "SafetensorsWriter", "save_tensors", "check_output_path", "data_section_sha256", "tensor_bytes"]
