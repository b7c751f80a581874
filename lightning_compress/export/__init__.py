"""Export: the compressed file format, ONNX int8, and the report of what each made."""

from .compressed import FORMAT_VERSION, CompressedFileError, load_compressed, save_compressed
from .onnx import export_onnx
from .report import CompressionReport, LayerReport

__all__ = [
    "FORMAT_VERSION",
    "CompressedFileError",
    "CompressionReport",
    "LayerReport",
    "export_onnx",
    "load_compressed",
    "save_compressed",
]
