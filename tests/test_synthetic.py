"""Synthetic GRACE checkpoints (grace_qat.synthetic; LLaVA's CLIP tower: tests/llava_fixtures.py):
written, read back, and checked against plain torch math that does not go through grace_qat.quantizer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from requires import require
import torch

import llava_fixtures
from grace_qat import synthetic
from grace_qat.architectures import is_quantizable_module
from grace_qat.checkpoint import GraceCheckpoint
from ckpt_files import load_all_tensors as _tensors

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QWEN_TINY_LAYERS = synthetic.QWEN3VL_SIZES_SPEC["tiny"]["layers"]
QWEN_MODULES = {f"model.language_model.layers.{i}.{p}" for i in range(QWEN_TINY_LAYERS) for p in PROJ}
QWEN_CASES = [("qat-sidecar", 4), ("qat-sidecar", 8), ("qat-inline", 4), ("qat-inline", 8),
              ("qat-grid", 4), ("qat-grid", 8), ("awq", 4), ("plain", 4)]


@pytest.fixture(scope="session")
def qwen_dirs(tmp_path_factory):
    """Every tiny Qwen3-VL format, seed 0, written once per session."""
    root = tmp_path_factory.mktemp("qwen3vl")
    return {(fmt, bits): synthetic.write_qwen3vl(str(root / f"{fmt}-w{bits}"), size="tiny", fmt=fmt,
                                                bits=bits, seed=0)
            for fmt, bits in QWEN_CASES}




def _independent_codes(w: torch.Tensor, log_scale: torch.Tensor, bits: int, g: int = 128) -> torch.Tensor:
    """codes = clamp(round(W / exp(log_scale))) with nothing but torch ops."""
    out_f, in_f = w.shape
    s = torch.exp(log_scale.float()).reshape(out_f, in_f // g, 1)
    q = torch.round(w.float().reshape(out_f, in_f // g, g) / s)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return q.clamp(lo, hi).reshape(out_f, in_f), s


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# -- detection -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,bits", QWEN_CASES)
def test_qwen_open_detects_format_bits_modules(qwen_dirs, fmt, bits):
    ckpt = GraceCheckpoint.open(qwen_dirs[(fmt, bits)])
    assert ckpt.format == fmt
    if fmt == "plain":
        assert ckpt.modules == [] and ckpt.bits is None
        return
    assert ckpt.bits == bits              # not stated on disk (except AWQ): derived from the codes
    assert ckpt.group_size == 128
    assert set(ckpt.modules) == QWEN_MODULES and len(ckpt.modules) == 7 * QWEN_TINY_LAYERS


def test_qwen_config_and_layout(qwen_dirs):
    for (fmt, bits), d in qwen_dirs.items():
        cfg = _config(d)
        assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"] and cfg["model_type"] == "qwen3_vl"
        assert "quantization_config" not in cfg
        assert ("awq_packing" in cfg) == (fmt == "awq")
        if fmt == "awq":
            assert cfg["awq_packing"] == {"bits": 4, "group_size": 128, "zero_point": 8, "version": "gemm"}
            with open(os.path.join(d, "awq_quantized_modules.json")) as f:
                meta = json.load(f)
            assert meta["bits"] == 4 and meta["group_size"] == 128 and set(meta["modules"]) == QWEN_MODULES
        assert os.path.exists(os.path.join(d, "qat_quantized_weights.bin")) == (fmt == "qat-sidecar")
        t = _tensors(d)
        # tiny: an untied head, row perm[i] along token i's embedding (greedy output walks perm's cycles)
        assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
        vocab = cfg["text_config"]["vocab_size"]
        emb, head = t["model.language_model.embed_tokens.weight"].float(), t["lm_head.weight"].float()
        assert head.shape == emb.shape
        cos = torch.nn.functional.normalize(head, dim=1) @ torch.nn.functional.normalize(emb, dim=1).t()
        best = cos.max(dim=1)
        assert bool((best.values > 0.99).all()) and len(set(best.indices.tolist())) == vocab
        assert t["model.language_model.embed_tokens.weight"].shape == (vocab, cfg["text_config"]["hidden_size"])
        assert any(k.startswith("model.visual.deepstack_merger_list.") for k in t)
        assert "model.visual.patch_embed.proj.weight" in t and "model.visual.merger.linear_fc2.weight" in t
        has_log_scale = any(k.endswith(".log_scale") for k in t)
        assert has_log_scale == (fmt == "qat-inline")


def test_qwen_tokenizer_matches_config(qwen_dirs):
    from tokenizers import Tokenizer
    d = qwen_dirs[("qat-sidecar", 4)]
    cfg = _config(d)
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    for name, key in (("<|image_pad|>", "image_token_id"), ("<|video_pad|>", "video_token_id"),
                      ("<|vision_start|>", "vision_start_token_id"), ("<|vision_end|>", "vision_end_token_id")):
        assert tok.token_to_id(name) == cfg[key] < cfg["text_config"]["vocab_size"]
    assert tok.token_to_id("<|im_end|>") == cfg["text_config"]["eos_token_id"]
    enc = tok.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>")
    assert cfg["image_token_id"] in enc.ids and tok.decode(enc.ids, skip_special_tokens=False).endswith("<|im_end|>")
    assert max(enc.ids) < cfg["text_config"]["vocab_size"]


# -- quantization math ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,bits", [c for c in QWEN_CASES if c[0] in ("qat-sidecar", "qat-inline")])
def test_qwen_codes_equal_independent_math_and_edge_codes(qwen_dirs, fmt, bits):
    d = qwen_dirs[(fmt, bits)]
    ckpt = GraceCheckpoint.open(d)
    t = _tensors(d)
    side = torch.load(os.path.join(d, "qat_quantized_weights.bin"), weights_only=True, mmap=True) \
        if fmt == "qat-sidecar" else None
    lo = -(2 ** (bits - 1))
    n_edge = 0
    for m in ckpt.modules:
        w = t[m + ".weight"]
        assert w.dtype == torch.bfloat16
        ls = side[m + ".log_scale"] if side is not None else t[m + ".log_scale"]
        assert ls.dtype == torch.float32 and ls.dim() == 1 and ls.numel() == w.numel() // 128
        q, s = _independent_codes(w, ls, bits)
        # on the grid: W is exactly (q * s) in fp32 cast to bf16
        assert torch.equal((q.reshape(s.shape[0], -1, 128) * s).reshape(w.shape).to(torch.bfloat16), w), m
        got = ckpt.quantized(m)
        assert torch.equal(got.codes.to(torch.float32), q), m
        n_edge += int((q == lo).sum())
        assert int(q.max()) == 2 ** (bits - 1) - 1, m    # the top code is used too
    assert n_edge > 0, f"no {lo} codes at all: the MSE-initialised scales should clip"


def test_qwen_edge_code_in_every_module_w4(qwen_dirs):
    ckpt = GraceCheckpoint.open(qwen_dirs[("qat-sidecar", 4)])
    for q in ckpt.iter_quantized():
        assert int(q.codes.min()) == -8 and int(q.codes.max()) == 7, q.name


def test_qwen_awq_unpacks_to_sidecar_codes(qwen_dirs):
    a = GraceCheckpoint.open(qwen_dirs[("awq", 4)])
    s = GraceCheckpoint.open(qwen_dirs[("qat-sidecar", 4)])
    assert a.modules == s.modules
    for m in a.modules:
        qa, qs = a.quantized(m), s.quantized(m)
        assert torch.equal(qa.codes.to(torch.int32), qs.codes.to(torch.int32)), m
        assert torch.equal(qa.scales, qs.scales.to(torch.float16).to(torch.float32)), m
    t = _tensors(qwen_dirs[("awq", 4)])
    m = a.modules[0]
    assert t[m + ".qweight"].dtype == torch.int32 and t[m + ".scales"].dtype == torch.float16
    assert m + ".weight" not in t


def test_qwen_grid_equals_sidecar_weights(qwen_dirs):
    g, s = _tensors(qwen_dirs[("qat-grid", 4)]), _tensors(qwen_dirs[("qat-sidecar", 4)])
    assert set(g) == set(s)
    for k in g:
        assert torch.equal(g[k], s[k]), k
    ckpt = GraceCheckpoint.open(qwen_dirs[("qat-grid", 4)])
    q = ckpt.quantized(ckpt.modules[0])     # steps derived from the grid alone reproduce the weight
    w = g[ckpt.modules[0] + ".weight"]
    recon = (q.codes.float().reshape(w.shape[0], -1, 128) * q.scales.unsqueeze(-1)).reshape(w.shape)
    ulp = torch.finfo(torch.bfloat16).eps * w.float().abs().clamp_min(1e-30)
    assert ((recon.to(torch.bfloat16).float() - w.float()).abs() <= ulp).all()   # within one bf16 ulp


def test_qwen_non_quantized_tensors_untouched(qwen_dirs):
    plain = _tensors(qwen_dirs[("plain", 4)])
    for (fmt, bits), d in qwen_dirs.items():
        t = _tensors(d)
        for k, v in plain.items():
            base = k.rsplit(".", 1)[0]
            if is_quantizable_module(base):
                if fmt in ("qat-sidecar", "qat-inline", "qat-grid"):
                    assert not torch.equal(t[k], v), f"{fmt}: {k} not quantized"
                continue
            assert v.dtype == torch.bfloat16, k
            assert torch.equal(t[k], v), f"{fmt} w{bits}: {k} differs from the plain checkpoint"
    assert torch.equal(plain["model.language_model.norm.weight"],
                       torch.ones_like(plain["model.language_model.norm.weight"]))
    assert torch.equal(plain["model.visual.blocks.0.norm1.bias"],
                       torch.zeros_like(plain["model.visual.blocks.0.norm1.bias"]))
    std = plain["model.language_model.layers.0.mlp.up_proj.weight"].float().std().item()
    assert 0.015 < std < 0.025


def test_qwen_sidecar_loads_weights_only_mmap(qwen_dirs):
    d = qwen_dirs[("qat-sidecar", 8)]
    side = torch.load(os.path.join(d, "qat_quantized_weights.bin"), weights_only=True, mmap=True)
    t = _tensors(d)
    assert set(side) == {f"{m}.{leaf}" for m in QWEN_MODULES for leaf in ("weight", "log_scale")}
    for m in QWEN_MODULES:
        assert side[m + ".weight"].dtype == torch.bfloat16
        assert torch.equal(side[m + ".weight"], t[m + ".weight"])


def test_qwen_seed_determinism(tmp_path, qwen_dirs):
    a = synthetic.write_qwen3vl(str(tmp_path / "a"), fmt="plain", seed=0)
    b = synthetic.write_qwen3vl(str(tmp_path / "b"), fmt="plain", seed=1)
    ref = _tensors(qwen_dirs[("plain", 4)])
    ta, tb = _tensors(a), _tensors(b)
    assert all(torch.equal(ta[k], ref[k]) for k in ref)
    assert not torch.equal(ta["model.visual.blocks.0.attn.qkv.weight"], tb["model.visual.blocks.0.attn.qkv.weight"])


def test_qwen_sharded_write(tmp_path):
    d = synthetic.write_qwen3vl(str(tmp_path / "sharded"), fmt="qat-sidecar", bits=4, max_shard_bytes=600_000)
    files = sorted(os.listdir(d))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    ckpt = GraceCheckpoint.open(d)
    assert ckpt.format == "qat-sidecar" and len(ckpt.modules) == len(QWEN_MODULES)
    ckpt.quantized(ckpt.modules[-1])
    # rewriting the same directory unsharded removes the stale shards and sidecar
    synthetic.write_qwen3vl(d, fmt="plain")
    assert not any(f.startswith("model-") for f in os.listdir(d))
    assert "qat_quantized_weights.bin" not in os.listdir(d)
    assert GraceCheckpoint.open(d).format == "plain"


def test_default_fixture(tmp_path):
    d = synthetic.write_default(str(tmp_path / "default"))
    ckpt = GraceCheckpoint.open(d)
    assert (ckpt.format, ckpt.bits, len(ckpt.modules)) == ("qat-sidecar", 4, len(QWEN_MODULES))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synthetic.write_qwen3vl(str(tmp_path / "x"), fmt="awq", bits=8)
    with pytest.raises(ValueError):
        synthetic.write_qwen3vl(str(tmp_path / "x"), fmt="gptq")
    with pytest.raises(ValueError):
        synthetic.write_qwen3vl(str(tmp_path / "x"), size="70b")


# -- Transformers round trip (names, tokenizer, processor) --------------------------------------------

def test_qwen_transformers_loads_plain_and_processor(qwen_dirs):
    transformers = require("transformers")
    from PIL import Image
    d = qwen_dirs[("qat-sidecar", 4)]
    model, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        d, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    proc = transformers.AutoProcessor.from_pretrained(d)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe")
    assert text.endswith("<|im_start|>assistant\n")
    inp = proc(text=[text], images=[Image.new("RGB", (64, 48), (200, 30, 30))], return_tensors="pt")
    n_img = int((inp["input_ids"] == model.config.image_token_id).sum())
    assert n_img == int(inp["image_grid_thw"].prod()) // 4 > 0
    with torch.no_grad():
        logits = model(**inp).logits[0, -1].float()
    assert torch.isfinite(logits).all() and logits.std() > 0.05


# -- stock vLLM (no plugin) loads the fixture as a Qwen3-VL checkpoint and answers an image chat --------

_VLLM_SCRIPT = r"""
import base64, io, json, sys
from PIL import Image
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024)
    img = Image.new("RGB", (64, 48), (200, 30, 30)); buf = io.BytesIO(); img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe this image."}]}]
    out = llm.chat(msgs, SamplingParams(max_tokens=4, temperature=0.0, logprobs=1))[0]
    c = out.outputs[0]
    print("GENERATED " + json.dumps({"prompt_ids": list(out.prompt_token_ids), "ids": list(c.token_ids),
          "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]}))
"""


@pytest.mark.engine
@pytest.mark.parametrize("fmt", ["plain"])
def test_qwen_tiny_serves_in_stock_vllm(tmp_path, fmt):
    """Stock vLLM (no plugin) and stock Transformers run the same fixture to the same greedy answer
    (fp32 on both sides, so that rounding cannot flip a token): same prompt ids (chat template,
    image tokens), same 4 generated ids, logprobs within 1e-3 nats."""
    require("vllm")
    transformers = require("transformers")
    from PIL import Image
    d = synthetic.write_qwen3vl(str(tmp_path / fmt), fmt=fmt, bits=4)
    script = tmp_path / "run.py"
    script.write_text(_VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_INT4_W4A8="0", VLLM_PLUGINS="none")
    r = subprocess.run([sys.executable, str(script), d], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("GENERATED ")][0]
    got = json.loads(line[len("GENERATED "):])
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    proc = transformers.AutoProcessor.from_pretrained(d)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inp = proc(text=[text], images=[Image.new("RGB", (64, 48), (200, 30, 30))], return_tensors="pt")
    assert inp["input_ids"][0].tolist() == got["prompt_ids"], "vLLM and Transformers prompts differ"
    with torch.no_grad():
        gen = model.generate(**inp, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    ids = gen.sequences[0, inp["input_ids"].shape[1]:].tolist()
    assert ids == got["ids"], f"stock vLLM generated {got['ids']}, Transformers {ids}"
    lps = [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(gen.logits, ids)]
    assert max(abs(a - b) for a, b in zip(lps, got["logprobs"])) < 1e-3, (lps, got["logprobs"])


# -- LLaVA-1.5 (original layout) -------------------------------------------------------------------

LLAVA_TINY_LAYERS = synthetic.LLAVA_SIZES_SPEC["tiny"]["layers"]
LLAVA_MODULES = {f"model.layers.{i}.{p}" for i in range(LLAVA_TINY_LAYERS) for p in PROJ}


@pytest.fixture(scope="session")
def llava_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {
        "qat-sidecar": llava_fixtures.write_llava(str(root / "sidecar"), fmt="qat-sidecar", bits=4, clip_dir="inline"),
        "awq": llava_fixtures.write_llava(str(root / "awq"), fmt="awq", bits=4),
        "plain": llava_fixtures.write_llava(str(root / "plain"), fmt="plain", clip_dir=str(root / "clip")),
        "clip": str(root / "clip"),
    }


def test_llava_layout_and_config(llava_dirs):
    cfg = _config(llava_dirs["qat-sidecar"])
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava"
    assert "text_config" not in cfg and "quantization_config" not in cfg
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_select_layer"] == -2
    assert cfg["image_aspect_ratio"] == "pad" and cfg["mm_use_im_start_end"] is False
    t = _tensors(llava_dirs["qat-sidecar"])
    h, mm = cfg["hidden_size"], cfg["mm_hidden_size"]
    assert t["model.mm_projector.0.weight"].shape == (h, mm) and t["model.mm_projector.2.weight"].shape == (h, h)
    assert t["lm_head.weight"].shape == (cfg["vocab_size"], h) and "model.norm.weight" in t
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    vis = [k for k in t if k.startswith("model.vision_tower.vision_tower.vision_model.")]
    assert vis and cfg["mm_vision_tower_config"]["hidden_size"] == mm
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in vis
    plain_cfg = _config(llava_dirs["plain"])
    assert plain_cfg["mm_vision_tower"] == os.path.abspath(llava_dirs["clip"])
    assert plain_cfg["torch_dtype"] == "float16"
    assert _tensors(llava_dirs["plain"])["lm_head.weight"].dtype == torch.float16
    assert _config(llava_dirs["awq"])["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert not any("vision_tower" in k for k in _tensors(llava_dirs["awq"]))


def test_llava_open_and_codes(llava_dirs):
    s = GraceCheckpoint.open(llava_dirs["qat-sidecar"])
    a = GraceCheckpoint.open(llava_dirs["awq"])
    assert (s.format, s.bits, set(s.modules)) == ("qat-sidecar", 4, LLAVA_MODULES)
    assert (a.format, a.bits, set(a.modules)) == ("awq", 4, LLAVA_MODULES)
    assert GraceCheckpoint.open(llava_dirs["plain"]).format == "plain"
    side = torch.load(os.path.join(llava_dirs["qat-sidecar"], "qat_quantized_weights.bin"),
                      weights_only=True, mmap=True)
    t = _tensors(llava_dirs["qat-sidecar"])
    edge = 0
    for m in s.modules:
        q, _ = _independent_codes(t[m + ".weight"], side[m + ".log_scale"], 4)
        assert torch.equal(s.quantized(m).codes.float(), q)
        assert torch.equal(a.quantized(m).codes.float(), q), m     # AWQ packs the same grid
        edge += int((q == -8).sum())
    assert edge > 0
    # non-quantized tensors are not on a grid and not touched: vision tower and projector stay random
    assert not torch.equal(t["model.mm_projector.0.weight"], t["model.mm_projector.0.weight"].float().round().bfloat16())


def test_llava_tokenizer_and_clip_dir(llava_dirs):
    spm = require("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(llava_dirs["plain"], "tokenizer.model"))
    cfg = _config(llava_dirs["plain"])
    assert sp.vocab_size() == cfg["vocab_size"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.piece_to_id("<0x0A>") == 13                     # Llama byte-fallback layout
    assert sp.piece_to_id("<image>") == sp.unk_id()           # no <image> token
    chunks = llava_fixtures.llava_prompt("What is this?").split("<image>")
    assert len(chunks) == 2 and sp.id_to_piece(sp.encode(chunks[1])[0]) == "\u2581"
    with open(os.path.join(llava_dirs["clip"], "preprocessor_config.json")) as f:
        pre = json.load(f)
    clip = _config(llava_dirs["clip"])
    assert pre["crop_size"]["height"] == clip["vision_config"]["image_size"]
    assert clip["vision_config"]["hidden_size"] == cfg["mm_hidden_size"]
    ct = _tensors(llava_dirs["clip"])
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in ct and "text_model.embeddings.token_embedding.weight" in ct
    assert all(v.dtype == torch.float16 for k, v in ct.items() if k != "logit_scale")
    transformers = require("transformers")
    model, info = transformers.CLIPModel.from_pretrained(llava_dirs["clip"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
