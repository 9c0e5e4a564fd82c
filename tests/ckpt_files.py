"""Plain readers of checkpoint files for the tests: the independent side of every comparison, so
they use safetensors directly and nothing from grace_qat."""
import os

import torch
from safetensors.torch import load_file


def load_all_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a directory (sharded or not)."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out
