"""The half of both adapters' GraceQATConfig that lives in the core (grace_qat.engine_config): one
lifecycle and one layer-name rule, checked here without an engine."""
import pickle

import pytest

from grace_qat.engine_config import GraceQATConfigBase
from grace_qat.errors import GraceFormatError

L0 = "layers.0."


class Config(GraceQATConfigBase):
    """What an adapter adds: its constructor (and, in the engines, their QuantizationConfig)."""
    engine = "TestEngine"

    def __init__(self, checkpoint_dir=None, **declared):
        self.init_checkpoint(checkpoint_dir, **declared)


def test_validated_once_with_no_reader_kept(tiny):
    cfg = Config()
    assert not cfg.validated and "not validated" in repr(cfg)
    with pytest.raises(GraceFormatError, match="no checkpoint directory: TestEngine"):
        cfg.checkpoint_modules("model.language_model.layers.0.mlp.down_proj")
    cfg = Config(tiny["qat-sidecar"])
    assert cfg.validated and cfg._reader is None          # validation opens, checks and closes
    assert (cfg.format, cfg.bits, cfg.group_size, cfg.weight_dtype) == ("qat-sidecar", 4, 128, "bfloat16")
    assert repr(cfg) == (f"GraceQATConfig(format=qat-sidecar, bits=4, group_size=128, "
                         f"modules={len(cfg.modules)}, path={cfg.checkpoint_dir!r})")
    with pytest.raises(GraceFormatError, match="format 'qat-sidecar'"):
        Config(tiny["qat-sidecar"], fmt="awq")            # what was declared must be what the files are


def test_one_reader_per_process_while_layers_load(tiny):
    cfg = Config(tiny["qat-sidecar"])
    cfg.layer_started()
    cfg.layer_started()
    reader = cfg.checkpoint()
    assert cfg.checkpoint() is reader
    copy = pickle.loads(pickle.dumps(cfg))                # what vLLM hands its workers: no reader
    assert copy._reader is None and copy.validated and copy.modules == cfg.modules
    cfg.layer_done()
    assert cfg._reader is reader                          # one layer still loads
    cfg.layer_done()
    assert cfg._reader is None                            # the last one is done: dropped
    assert cfg.checkpoint() is not reader                 # a later use opens it again


@pytest.mark.parametrize("outer", ["model.language_model.", "language_model.model.", ""])
def test_layer_names_by_decoder_layer_whatever_the_outer_prefix(tiny, outer):
    """SGLang's prefixes, vLLM's after its WeightsMapper, and none: the same checkpoint modules."""
    cfg = Config(tiny["qat-sidecar"])
    ckpt = "model.language_model." + L0
    assert cfg.checkpoint_modules(outer + L0 + "self_attn.qkv_proj") == [
        ckpt + f"self_attn.{p}_proj" for p in "qkv"]
    assert cfg.checkpoint_modules(outer + L0 + "mlp.gate_up_proj") == [ckpt + "mlp.gate_proj",
                                                                       ckpt + "mlp.up_proj"]
    assert cfg.checkpoint_modules(outer + L0 + "mlp.down_proj") == [ckpt + "mlp.down_proj"]


@pytest.mark.parametrize("prefix", [
    "visual.blocks.0.attn.qkv", "visual.merger.linear_fc1", "lm_head",
    "vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj",   # spelt like a decoder layer
    "model.visual.layers.0.self_attn.o_proj", "model.language_model.layers.99.mlp.down_proj"])
def test_layers_outside_the_quantized_language_model_are_not_matched(tiny, prefix):
    assert Config(tiny["qat-sidecar"]).checkpoint_modules(prefix) is None


def test_a_partly_quantized_fused_layer_is_refused(tiny):
    cfg = Config(tiny["qat-sidecar"])
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj", "x_proj"]}
    with pytest.raises(GraceFormatError, match=r"TestEngine fuses .* into language_model\.model\.layers\.0\."
                                               r"self_attn\.qkv_proj, but .*x_proj'\] are not quantized"):
        cfg.checkpoint_modules("language_model.model.layers.0.self_attn.qkv_proj")
