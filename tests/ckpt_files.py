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


def with_inline_log_scales(src: str, dst: str) -> str:
    """A copy of a one-file qat-sidecar checkpoint whose safetensors also hold the sidecar's
    ``<module>.log_scale`` tensors, as a real export can leave them behind."""
    import shutil

    from safetensors.torch import save_file
    shutil.copytree(src, dst)
    st = os.path.join(dst, "model.safetensors")
    assert not os.path.exists(os.path.join(dst, "model.safetensors.index.json")), "one-file fixtures only"
    side = torch.load(os.path.join(dst, "qat_quantized_weights.bin"), weights_only=True)
    raw = load_file(st)
    raw.update({k: v for k, v in side.items() if k.endswith(".log_scale")})
    save_file(raw, st, metadata={"format": "pt"})
    return dst
