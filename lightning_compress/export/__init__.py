"""Export: the compressed file format, ONNX int8, and the report of what each made."""

from .compressed import FORMAT_VERSION, CompressedFileError, load_compressed, save_compressed
from .onnx import export_onnx
from .pretrained import from_pretrained
from .report import CompressionReport, LayerReport

__all__ = [
    "FORMAT_VERSION",
    "CompressedFileError",
    "CompressionReport",
    "LayerReport",
    "export_onnx",
    "from_pretrained",
    "load_compressed",
    "save_compressed",
]
