"""Writing tensors as Hugging Face-style safetensors shards (one file, or shards + an index).

Shared by the converter and the synthetic checkpoints so that every checkpoint this package writes is laid out
the same way the engines and Transformers expect.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from .files import SAFETENSORS_INDEX_NAME
from .errors import GraceFormatError

DEFAULT_MAX_SHARD_BYTES = 4 * 1000 ** 3          # HF-style shards of at most ~4 GB


class ShardWriter:
    """Accumulates CPU tensors and writes HF-style shards: ``model.safetensors`` when everything fits
    in one, else ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``."""

    def __init__(self, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, verify: bool = False):
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []     # key lists of flushed shards (written as tmp names)
        self.total_bytes = 0
        self.total_params = 0
        self.keep_digests = verify            # hashing costs ~1 s per GB: only where verify() follows
        self.digests: dict[str, str] = {}     # name -> sha256 of what was handed in (for verify())
        self.files: dict[str, str] = {}       # name -> file it was published in

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self.keep_digests:
            self.digests[name] = tensor_digest(t)
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = t
        self.current_bytes += nbytes
        self.total_bytes += nbytes
        self.total_params += t.numel()

    def _tmp(self, i: int) -> str:
        return os.path.join(self.out_dir, f".shard-{i:05d}.safetensors.tmp")

    def _flush(self) -> None:
        from safetensors.torch import save_file
        if not self.current:
            return
        save_file(self.current, self._tmp(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def _publish(self, i: int, fname: str) -> None:
        dst = os.path.join(self.out_dir, fname)
        os.replace(self._tmp(i), dst)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(dst, 0o666 & ~umask)           # safetensors creates its files 0600

    def close(self) -> list[str]:
        self._flush()
        n = len(self.shards)
        for stale in os.listdir(self.out_dir):          # a rewrite in place must not leave old shards
            if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", stale) or stale == SAFETENSORS_INDEX_NAME:
                os.remove(os.path.join(self.out_dir, stale))
        if n == 1:
            self._publish(0, "model.safetensors")
            self.files = {k: "model.safetensors" for k in self.shards[0]}
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, keys in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._publish(i, fname)
            names.append(fname)
            weight_map.update({k: fname for k in keys})
        self.files = dict(weight_map)
        index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, SAFETENSORS_INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return names

    def verify(self) -> None:
        """Read every published tensor back and compare it with what was handed to add()."""
        from safetensors import safe_open
        if not self.keep_digests:
            raise RuntimeError("ShardWriter.verify() needs ShardWriter(..., verify=True)")
        by_file: dict[str, list[str]] = {}
        for name, fname in self.files.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            path = os.path.join(self.out_dir, fname)
            with safe_open(path, framework="pt") as f:
                stored = set(f.keys())
                for name in names:
                    if name not in stored or tensor_digest(f.get_tensor(name)) != self.digests[name]:
                        raise GraceFormatError(f"{path}: tensor {name} does not read back as written "
                                               f"(disk full or failing storage?)")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
