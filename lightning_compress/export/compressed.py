"""A compressed file that is really smaller: ``save_compressed`` / ``load_compressed``.

Writing is :mod:`.save`, reading :mod:`.load`. The container (header, checksum, LZMA under a cap) is
:mod:`.container`; the manifest's named records and their checks against the model are :mod:`.records`. The
manifest names every entry of the model's ``state_dict`` with its shape and dtype. Weights of fake-quantized
layers are stored as their integer codes (packed 2/4/8 bits) at their nonzero positions, with the scales;
other floating tensors with many zeros as positions plus values; everything else as it is. Positions are a
bitmask or a gap stream, whichever is smaller for that tensor.

A file is untrusted input. Loading checks the header, the declared sizes against what the model
can need, the checksum, then every record of the manifest against the model, and only then
decompresses the data, never more than the manifest accounts for: whatever a file says, loading
costs at most about twice the model's own size in memory, and a refused file leaves the model
untouched.
"""

from __future__ import annotations

from .container import FORMAT_VERSION, CompressedFileError
from .load import load_compressed
from .save import save_compressed

__all__ = ["FORMAT_VERSION", "CompressedFileError", "load_compressed", "save_compressed"]
