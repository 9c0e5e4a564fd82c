"""grace_qat: the engine-independent core for GRACE quantization-aware-trained checkpoints.

Reading and verifying the GRACE formats (checkpoint), the quantizer math (quantizer), kernel
layouts (packing), conversion to standard formats (convert), synthetic checkpoints (synthetic)
and the ``grace-qat`` CLI (cli). No engine is imported here.
"""
from .errors import GraceFormatError

__all__ = ["GraceFormatError", "GraceCheckpoint", "QuantizedLinear", "load_sidecar"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The checkpoint reader on first use: importing the package (the CLI's --help) needs no torch."""
    if name in ("GraceCheckpoint", "QuantizedLinear", "load_sidecar"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'grace_qat' has no attribute {name!r}")
