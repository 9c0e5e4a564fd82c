"""grace_qat: the engine-independent core for GRACE quantization-aware-trained checkpoints.

Reading and verifying the GRACE formats (checkpoint), the quantizer math (quantizer), kernel
layouts (packing), conversion to standard formats (convert), synthetic checkpoints (fixtures)
and the ``grace-qat`` CLI (cli). No engine is imported here.
"""
from .errors import GraceFormatError
from .checkpoint import GraceCheckpoint, QuantizedLinear, load_sidecar

__all__ = ["GraceFormatError", "GraceCheckpoint", "QuantizedLinear", "load_sidecar"]
__version__ = "0.1.0"
