"""The engine-independent half of both adapters' ``GraceQATConfig`` (vLLM's and SGLang's quantization
config): one set of names, and one lifecycle for the checkpoint reader.

Names (small, plain state: vLLM pickles its config to the engine core and the workers):
``checkpoint_dir``, ``format`` (the name), ``bits``, ``group_size``, ``modules``, ``bits_inferred``,
``weight_dtype``, ``stock_config``; ``checkpoint()`` is this process's reader;
``checkpoint_modules(prefix)`` the checkpoint modules behind an engine layer (None: not quantized).

Lifecycle, the same on both engines:

1. *declared*: the constructor takes what a ``quantization_config`` declares (format, bits, group
   size) and, where the engine says it, the checkpoint directory. Nothing else.
2. *validated*, once, as soon as the config knows the checkpoint: in the constructor when it is
   given a directory (SGLang's ``from_config``), in ``validate`` (vLLM's ``maybe_update_config``),
   else when the first layer asks (the model path the engine publishes). Detection, the format's
   checks and every step and zero point (``check_served``) run there, so that a bad checkpoint is
   one line before the engine starts its workers (an error in a vLLM worker reaches the user only as
   "Engine core initialization failed"); what they found is kept as the plain state above.
3. *open while layers load*: each process opens its own reader when a layer first needs it
   (``checkpoint()``), and drops it when the last quantized layer it built has processed its
   weights (``layer_started`` / ``layer_done``); a later use opens it again. Validation keeps no
   reader: vLLM validates in its API-server process, which never loads a weight, and pickles the
   config to processes that cannot share one.

Why not open eagerly and hold the reader (as SGLang's adapter did) or open lazily without
validating (as vLLM's workers do): the first would hold every safetensors handle and the
memory-mapped sidecar (several GB for LLaVA-1.5-7B) in a process that serves for days, and in
vLLM's API server, which never reads them; the second would report a bad checkpoint from a worker.
"""
from __future__ import annotations

import logging
import os

from . import formats, layer_names
from .checkpoint import GraceCheckpoint
from .errors import GraceFormatError
from .hub import local_checkpoint_dir


class GraceQATConfigBase:
    """Mixed into each adapter's ``GraceQATConfig`` before the engine's ``QuantizationConfig``.

    An adapter sets ``engine`` (its name in messages) and ``logger``, and may override
    :meth:`engine_model_path` (where the engine publishes the model it loads) and
    :meth:`on_validated` (its own start-up line)."""

    engine = "the engine"
    logger = logging.getLogger("grace_qat")

    def init_checkpoint(self, checkpoint_dir: str | os.PathLike | None = None, fmt: str | None = None,
                        bits: int | None = None, group_size: int | None = None) -> None:
        """Step 1 (and 2 when ``checkpoint_dir`` is given): call from the adapter's ``__init__``."""
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        self.format = fmt
        self.bits = int(bits) if bits is not None else None
        self.group_size = int(group_size) if group_size is not None else None
        self.modules: list[str] = []          # checkpoint module names
        self.bits_inferred = False
        self.weight_dtype: str | None = None   # storage dtype of 16-bit grid weights, e.g. "bfloat16"
        self.stock_config: dict | None = None  # a stock quantization_config the files load under
        self.validated = False
        self._index: dict[str, str] = {}       # decoder-layer key -> checkpoint module
        self._reader: GraceCheckpoint | None = None   # per process, never pickled
        self._open_layers = 0                  # quantized layers built but not yet processed
        if self.checkpoint_dir is not None:
            self.validate(self.checkpoint_dir)

    def __repr__(self) -> str:
        if not self.validated:
            return f"GraceQATConfig(checkpoint_dir={self.checkpoint_dir!r}, not validated)"
        return (f"GraceQATConfig(format={self.format}, bits={self.bits}, group_size={self.group_size}, "
                f"modules={len(self.modules)}, path={self.checkpoint_dir!r})")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_open_layers": 0}

    # -- step 2 --------------------------------------------------------------------------------

    def validate(self, model: str | os.PathLike, revision: str | None = None) -> None:
        """Open ``model`` (a directory, or a Hub id through the local cache), check it against what
        was declared and check every step and zero point; keep what was found. Keeps no reader."""
        path = local_checkpoint_dir(os.fspath(model), revision)
        ckpt = GraceCheckpoint.open(path, bits=self.bits, group_size=self.group_size, fmt=self.format)
        ckpt.require_quantized()
        index = layer_names.module_index(path, ckpt.modules)
        ckpt.check_served()     # steps and zero points, before anything is loaded
        self.checkpoint_dir, self.format = path, ckpt.format
        self.bits, self.group_size, self.modules = ckpt.bits, ckpt.group_size, list(ckpt.modules)
        self.bits_inferred = self.bits_inferred or ckpt.bits_inferred   # the first validation's
        stored = ckpt.weight_dtype()
        self.weight_dtype = str(stored).removeprefix("torch.") if stored is not None else None
        self.stock_config = ckpt.stock_config()
        self._index, self.validated = index, True
        spare = formats.spare_note(ckpt)
        if spare:
            self.logger.info("grace_qat: %s", spare)
        self.on_validated()

    def on_validated(self) -> None:
        """The adapter's start-up line (and anything it derives from the validated state)."""

    def engine_model_path(self) -> str | None:
        """The model the engine loads, where it publishes it (for a config built without one)."""
        return None

    def ensure_validated(self) -> None:
        if self.validated:
            return
        model = self.checkpoint_dir or self.engine_model_path()
        if model is None:
            raise GraceFormatError(f"grace_qat: no checkpoint directory: {self.engine} did not publish a "
                                   f"model path and the config names none")
        self.validate(model)

    # -- names ---------------------------------------------------------------------------------

    def checkpoint_modules(self, prefix: str) -> list[str] | None:
        """Checkpoint modules behind the engine layer ``prefix`` (several for a fused layer), in
        shard order; None when it is not quantized (:func:`grace_qat.layer_names.checkpoint_modules`)."""
        self.ensure_validated()
        fused = getattr(self, "packed_modules_mapping", None)   # the engine's QuantizationConfig sets it
        return layer_names.checkpoint_modules(self._index, prefix, fused, self.checkpoint_dir, self.engine)

    # -- step 3 --------------------------------------------------------------------------------

    def checkpoint(self) -> GraceCheckpoint:
        """This process's reader of the checkpoint, opened on first use (validated before)."""
        if self._reader is None:
            self.ensure_validated()
            self._reader = GraceCheckpoint.open(self.checkpoint_dir, bits=self.bits,
                                                group_size=self.group_size, fmt=self.format)
        return self._reader

    def layer_started(self) -> None:
        """A quantized layer that reads the checkpoint was built in this process."""
        self._open_layers += 1

    def layer_done(self) -> None:
        """A quantized layer finished processing its weights; drop the reader after the last one."""
        self._open_layers = max(0, self._open_layers - 1)
        if self._open_layers == 0:
            self._reader = None


__all__ = ["GraceQATConfigBase"]
