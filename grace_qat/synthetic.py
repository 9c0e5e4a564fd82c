"""Synthetic GRACE checkpoints, written from a seed exactly as the real releases lay them out: what
``grace-qat fixture`` writes, and the demo serves when given no checkpoint.

No checkpoint can be downloaded on the machines this project runs on, so the demo, the tests and the
benchmarks generate their own, following the formats as the README's "Support matrix" and
:mod:`grace_qat.formats` describe them:

  * ``write_qwen3vl(out_dir, size="tiny"|"2b", fmt=..., bits=4|8, seed=0)``: a Transformers
    ``Qwen3VLForConditionalGeneration`` checkpoint (config, sharded safetensors, tokenizer, chat
    template, image/video processor configs, generation config);
  * ``write_llava(out_dir, size="tiny"|"7b", fmt=..., bits=4, seed=0)``: the original LLaVA-1.5
    layout (``LlavaLlamaForCausalLM``) with a SentencePiece tokenizer; like the release, without the
    CLIP vision tower (the tests' tiny tower: ``tests/llava_fixtures.py``);
  * ``write_default(out_dir)``: the embedded default, tiny Qwen3-VL, W4, format A (``qat-sidecar``).

Formats (``fmt``): ``qat-sidecar`` (A: grid weights + ``qat_quantized_weights.bin``), ``qat-inline``
(grid weights + ``<module>.log_scale`` in the safetensors), ``qat-grid`` (grid weights only), ``awq``
(B: AutoAWQ GEMM packed, 4-bit) and ``plain`` (unquantized BF16, the GRACE-BF16 release shape).

Weights are random (normal, std 0.02; norms 1, norm biases 0), drawn per tensor from a generator
seeded by (seed, tensor name), so a tensor does not depend on the format or on the other tensors.
The tiny Qwen3-VL's text head is untied and structured (``_chain_text_head``) so that its greedy
output is not one repeated token.
Quantization follows the GRACE recipe bit for bit: ``log_scale = mse_init_log_scale(W)``,
``W_dq = fake_quantize(W, exp(log_scale))`` in fp32, cast to BF16. Large checkpoints are generated
on the GPU when one is present (the numbers then differ from a CPU run with the same seed; the
structure is identical).

Engine-independent: torch and safetensors at import time; transformers (only to enumerate tensor
names and shapes from the real model class, on the meta device), tokenizers, sentencepiece and PIL
are imported inside the functions that need them.
"""
from __future__ import annotations

import functools
import json
import os
import re
import zlib
from typing import Iterable

import torch

from . import formats
from .architectures import is_quantizable_module
from .shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from .quantizer import DEFAULT_GROUP_SIZE, check_bits, effective_group_size, fake_quantize, mse_init_log_scale

FORMATS = formats.names()
QWEN3VL_SIZES = ("tiny", "2b")
LLAVA_SIZES = ("tiny", "7b")
INIT_STD = 0.02


# =============================================================================================
# Generic machinery: per-tensor seeded init, GRACE quantization, shard writing
# =============================================================================================

def pick_device(device: str | torch.device | None, n_params: int) -> torch.device:
    if device is not None:
        return torch.device(device)
    # Small checkpoints on the CPU (reproducible everywhere); big ones on the GPU when present.
    if n_params > 50_000_000 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63 - 1)


_NORM = re.compile(r"(^|\.)[^.]*(norm|ln_q|layernorm|layer_norm|ln_f|ln_1|ln_2|pre_layrnorm)[^.]*\.(weight|bias)$")


def _init_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Norm weights 1, norm biases 0, everything else N(0, 0.02^2) from a per-name generator."""
    if name.endswith("logit_scale") and len(shape) == 0:       # CLIP's temperature: ln(1/0.07)
        return torch.full(shape, 2.6592, dtype=dtype, device=device)
    m = _NORM.search(name)
    if m and len(shape) == 1:
        fill = 1.0 if m.group(3) == "weight" else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(_tensor_seed(seed, name))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return t.mul_(INIT_STD).to(dtype)


def grace_quantize(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRACE recipe for one linear: (W_dq in W's dtype, log_scale fp32 flat (out*in/G,)).

    log_scale is the LSQ MSE initialisation; W_dq = clamp(round(W/s)) * s in fp32, cast back.
    """
    out_f, in_f = weight.shape
    log_scale = mse_init_log_scale(weight, bits, group_size)
    g = effective_group_size(in_f, group_size)
    scales = torch.exp(log_scale.to(torch.float32)).reshape(out_f, in_f // g)
    w_dq = fake_quantize(weight, scales, bits, group_size)
    return w_dq, log_scale.to(torch.float32)


def _quantized_linear(name: str, shape: tuple[int, ...], seed: int, bits: int, group_size: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 master weight of ``name`` run through the GRACE recipe; small CPU ones are memoised so
    that writing several formats of one seed in a process quantizes each layer once."""
    if device.type == "cpu" and numel(shape) <= 4 * 1024 * 1024:
        return _quantized_linear_cached(name, shape, seed, bits, group_size)
    return grace_quantize(_init_tensor(name, shape, seed, torch.bfloat16, device), bits, group_size)


@functools.lru_cache(maxsize=256)
def _quantized_linear_cached(name, shape, seed, bits, group_size):
    w_dq, log_scale = grace_quantize(_init_tensor(name, shape, seed, torch.bfloat16, torch.device("cpu")),
                                     bits, group_size)
    w_dq.requires_grad_(False)
    return w_dq, log_scale


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _check_args(fmt: str, bits: int, group_size: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    check_bits(bits)
    if bits not in formats.get(fmt).fixture_bits:
        raise ValueError(f"the {fmt} format is {'/'.join(map(str, formats.get(fmt).fixture_bits))}-bit only")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")


def write_weights(out_dir: str, specs: list[tuple[str, tuple[int, ...]]], *, fmt: str, bits: int,
                   group_size: int, seed: int, dtype: torch.dtype, device: torch.device,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, init: dict | None = None) -> list[str]:
    """Generate every tensor of ``specs`` (in order), quantize the GRACE linears per ``fmt``, write
    shards (+ sidecar / AWQ module list). Returns the quantized module names (natural order).

    The quantized linears are always trained, quantized and stored in BF16 (GRACE's QAT dtype), so
    the AWQ codes of a seed equal its QAT-grid codes whatever ``dtype`` the other tensors get."""
    # Small CPU work is many tiny ops: OpenMP threads only add barrier stalls (10x slower on a busy
    # 2-core machine), so run single-threaded and restore the caller's setting afterwards.
    threads = torch.get_num_threads()
    if device.type == "cpu" and sum(numel(sh) for _, sh in specs) < 50_000_000:
        torch.set_num_threads(1)
    try:
        return _write_weights_inner(out_dir, specs, fmt=fmt, bits=bits, group_size=group_size, seed=seed,
                                    dtype=dtype, device=device, max_shard_bytes=max_shard_bytes, init=init or {})
    finally:
        torch.set_num_threads(threads)


def _write_weights_inner(out_dir, specs, *, fmt, bits, group_size, seed, dtype, device, max_shard_bytes, init):
    rules = formats.get(fmt)          # the registered format of that name
    writer = ShardWriter(out_dir, max_shard_bytes)
    sidecar: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for name, shape in specs:
        base, _, leaf = name.rpartition(".")
        if rules.quantizes and leaf == "weight" and len(shape) == 2 and is_quantizable_module(base):
            w_dq, log_scale = _quantized_linear(name, tuple(shape), seed, bits, group_size, device)
            modules.append(base)
            for k, v in rules.fixture_module(base, w_dq, log_scale, bits, group_size, sidecar).items():
                writer.add(k, v)
            continue
        if rules.quantizes and leaf == "bias" and is_quantizable_module(base):
            b = _init_tensor(name, tuple(shape), seed, dtype, device)
            writer.add(name, b)
            rules.fixture_bias(name, b, sidecar)
            continue
        make = init.get(name, _init_tensor)
        writer.add(name, make(name, tuple(shape), seed, dtype, device))
    writer.close()
    rules.fixture_files(out_dir, modules, group_size, sidecar)
    for other in formats.all_formats():       # files another format left in a reused directory
        for stale in other.side_files:
            p = os.path.join(out_dir, stale)
            if stale not in rules.side_files and os.path.exists(p):
                os.remove(p)
    return modules


def meta_state_dict_specs(model_cls, config, drop: Iterable[str] = ()) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the Transformers model saves, from a meta-device instance."""
    with torch.device("meta"):
        model = model_cls(config)
    drop = set(drop)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k not in drop]


# =============================================================================================
# Qwen3-VL
# =============================================================================================

# Qwen2/Qwen3 special tokens in id order, starting right after the regular BPE vocabulary
# (151643 in the real tokenizer).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
# Which of them are "special" (skipped when decoding) in the real tokenizer_config.json.
_QWEN_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

_QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN3VL_SIZES_SPEC = {
    # Qwen3-VL-2B-Instruct (config.json of the release; transformers 4.57 spelling).
    "2b": dict(base_vocab=151643, vocab_size=151936, hidden=2048, intermediate=6144, layers=28, heads=16,
               kv_heads=8, head_dim=128, mrope_section=[24, 20, 20], max_pos=262144,
               v_depth=24, v_hidden=1024, v_intermediate=4096, v_heads=16, deepstack=[5, 11, 17],
               min_pixels=65536, max_pixels=16777216, video_min_pixels=4096, video_max_pixels=25165824),
    # Tiny: every quantized in_features a multiple of 128, and of 256 for the row-parallel ones
    # (o_proj, down_proj) so that TP=2 keeps whole groups; heads and KV heads split by 2.
    # Its text head is untied and built so that greedy decoding is not one repeated token (see
    # _chain_text_head).
    "tiny": dict(base_vocab=1024, vocab_size=1152, hidden=256, intermediate=512, layers=4, heads=4,
                 kv_heads=2, head_dim=64, mrope_section=[12, 10, 10], max_pos=32768, chain_head=True,
                 v_depth=3, v_hidden=128, v_intermediate=512, v_heads=2, deepstack=[0, 1, 2],
                 min_pixels=16384, max_pixels=262144, video_min_pixels=4096, video_max_pixels=262144),
}


def qwen_special_ids(base_vocab: int) -> dict[str, int]:
    return {tok: base_vocab + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}


def qwen3vl_config(size: str = "tiny") -> dict:
    """config.json of a Qwen3-VL checkpoint (the release's spelling: rope_scaling + rope_theta)."""
    if size not in QWEN3VL_SIZES_SPEC:
        raise ValueError(f"size must be one of {tuple(QWEN3VL_SIZES_SPEC)}, got {size!r}")
    s = QWEN3VL_SIZES_SPEC[size]
    ids = qwen_special_ids(s["base_vocab"])
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "dtype": "bfloat16",
            "eos_token_id": ids["<|im_end|>"],
            "head_dim": s["head_dim"],
            "hidden_act": "silu",
            "hidden_size": s["hidden"],
            "initializer_range": 0.02,
            "intermediate_size": s["intermediate"],
            "max_position_embeddings": s["max_pos"],
            "model_type": "qwen3_vl_text",
            "num_attention_heads": s["heads"],
            "num_hidden_layers": s["layers"],
            "num_key_value_heads": s["kv_heads"],
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": list(s["mrope_section"]),
                             "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": not s.get("chain_head"),
            "use_cache": True,
            "vocab_size": s["vocab_size"],
        },
        "tie_word_embeddings": not s.get("chain_head"),
        "transformers_version": "4.57.0.dev0",
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "deepstack_visual_indexes": list(s["deepstack"]),
            "depth": s["v_depth"],
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": s["v_hidden"],
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": s["v_intermediate"],
            "model_type": "qwen3_vl",
            "num_heads": s["v_heads"],
            "num_position_embeddings": 2304,
            "out_hidden_size": s["hidden"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


QWEN3VL_EMBED = "model.language_model.embed_tokens.weight"
CHAIN_EMBED_SCALE = 10.0     # embeddings 10x the usual init (std 0.2): the residual stream carries the token
CHAIN_HEAD_SCALE = 2.0       # head rows 2x (std 0.04): the chosen token's logit ~10 above the rest


def _chain_text_head(embed_name: str) -> dict:
    """Tensor generators for an untied text head whose greedy output walks a cycle of tokens.

    With every weight N(0, 0.02^2) a tiny model's attention outputs outweigh the token embeddings
    and its greedy output is one token repeated (e.g. [1109] * 16), which makes comparisons of
    generated tokens carry almost no signal. Here the embeddings are scaled up (the current token
    dominates the residual stream) and the head maps token i's direction to token perm[i] for a
    random permutation perm, so greedy decoding follows perm's cycles (many distinct tokens) while
    every quantized layer still moves every logit. Both tensors come from the same N(0, 0.02^2)
    draw of the embedding's name."""
    def embed(name, shape, seed, dtype, device):
        return (_init_tensor(embed_name, shape, seed, torch.float32, device) * CHAIN_EMBED_SCALE).to(dtype)

    def head(name, shape, seed, dtype, device):
        base = _init_tensor(embed_name, shape, seed, torch.float32, device)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_tensor_seed(seed, name))
        perm = torch.randperm(shape[0], generator=gen).to(device)
        out = torch.empty_like(base)
        out[perm] = base * CHAIN_HEAD_SCALE                 # row perm[i] = token i's direction
        return out.to(dtype)

    return {embed_name: embed, "lm_head.weight": head}


def qwen3vl_tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes as Transformers' Qwen3VLForConditionalGeneration saves them (tied lm_head
    dropped), read off a meta-device instance of the real class."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    cfg = Qwen3VLConfig.from_dict(dict(config))
    drop = ("lm_head.weight",) if config.get("tie_word_embeddings") else ()
    return meta_state_dict_specs(Qwen3VLForConditionalGeneration, cfg, drop)


# A Qwen3-VL-Instruct style chat template (system/user/assistant, text, images and videos).
QWEN3VL_CHAT_TEMPLATE = r"""{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\n' -}}
{%- if message.content is string -%}
{{- message.content -}}
{%- else -%}
{%- for content in message.content -%}
{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}
{%- set image_count.value = image_count.value + 1 -%}
{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif content.type == 'video' or 'video' in content -%}
{%- set video_count.value = video_count.value + 1 -%}
{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in content -%}
{{- content.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Deterministic training text for the synthetic tokenizers (English prose, chat words, digits).
_CORPUS = """
You are a helpful assistant. Describe this image in detail. What is in the picture? The image shows a
red square on a white background, a small blue circle, a green triangle and a yellow star. There is a
cat sitting on a wooden table next to a cup of coffee. A dog runs across the green grass in the park.
The quick brown fox jumps over the lazy dog. How many objects are there in the image? There are three
objects. What colour is the car? The car is red. Where is the person standing? The person is standing
near the door of the house. Please answer the question with a single word or phrase. Answer yes or no.
Question: what is written on the sign? Answer: stop. The chart shows the number of students in each
class from January to December. Read the text in the document and summarize it in one sentence.
Mathematics, science, history, geography, music and art are subjects taught at school every day.
The weather today is sunny with a few clouds in the sky; tomorrow it will rain in the morning.
Quantization-aware training keeps the model accurate at four and eight bits with learned step sizes.
Large language models answer questions about images, charts, tables, screenshots and documents.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 100 256 1000 2024 2025 2026.
def main(): return [x * 2 for x in range(10)] if True else None  # code, brackets {} () [] <> = + - * /
Hello world! Hi, how are you? I am fine, thank you. Good morning, good evening, good night.
user assistant system image video picture photo frame left right top bottom center middle above below.
"""


def _corpus_lines() -> list[str]:
    lines = [ln.strip() for ln in _CORPUS.strip().splitlines() if ln.strip()]
    words = sorted(set(re.findall(r"[A-Za-z]+", _CORPUS)))
    # Extra variety (word pairs, capitalised forms) so the BPE trainer can reach its target size.
    extra = [" ".join(words[i:i + 7]) for i in range(0, len(words), 3)]
    extra += [" ".join(w.capitalize() for w in words[i:i + 5]) for i in range(0, len(words), 4)]
    extra += [" ".join(w.upper() for w in words[i:i + 4]) for i in range(0, len(words), 5)]
    return lines * 4 + extra


@functools.lru_cache(maxsize=4)
def _qwen_tokenizer_json(base_vocab: int) -> str:
    """A Qwen2TokenizerFast-compatible byte-level BPE: trained on a small corpus, padded with
    unreachable filler entries to ``base_vocab`` so that the specials land where the config says."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    target = min(base_vocab, 1024)
    trainer = trainers.BpeTrainer(vocab_size=target, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    n = len(vocab)
    if n > base_vocab:
        raise RuntimeError(f"trained BPE vocabulary {n} exceeds the base vocabulary {base_vocab}")
    # Filler entries: strings no merge produces (they contain a NUL byte that the byte-level
    # alphabet maps elsewhere), so they are never emitted and only shift the special-token ids.
    for i in range(n, base_vocab):
        vocab[f"\u0000<|reserved_{i}|>"] = i
    data["added_tokens"] = [
        {"id": base_vocab + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": t not in _QWEN_NOT_SPECIAL}
        for i, t in enumerate(QWEN_SPECIAL_TOKENS)]
    return json.dumps(data, ensure_ascii=False)


def _write_qwen_tokenizer(out_dir: str, base_vocab: int) -> None:
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(_qwen_tokenizer_json(base_vocab))
    added = {str(base_vocab + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": t not in _QWEN_NOT_SPECIAL}
             for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                      "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                      "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                                      "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen3VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(QWEN3VL_CHAT_TEMPLATE)


def _write_qwen3vl_processor(out_dir: str, s: dict) -> None:
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "processor_class": "Qwen3VLProcessor"}
    write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "size": {"longest_edge": s["max_pixels"], "shortest_edge": s["min_pixels"]}, **common,
        "image_processor_type": "Qwen2VLImageProcessorFast"})
    write_json(os.path.join(out_dir, "video_preprocessor_config.json"), {
        "size": {"longest_edge": s["video_max_pixels"], "shortest_edge": s["video_min_pixels"]}, **common,
        "video_processor_type": "Qwen3VLVideoProcessor"})


def write_qwen3vl(out_dir: str, *, size: str = "tiny", fmt: str = "qat-sidecar", bits: int = 4,
                  seed: int = 0, group_size: int = DEFAULT_GROUP_SIZE, device: str | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Write a synthetic Qwen3-VL GRACE checkpoint (``size`` "tiny" or "2b") into ``out_dir``."""
    _check_args(fmt, bits, group_size)
    config = qwen3vl_config(size)
    s = QWEN3VL_SIZES_SPEC[size]
    os.makedirs(out_dir, exist_ok=True)
    specs = qwen3vl_tensor_specs(config)
    dev = pick_device(device, sum(numel(sh) for _, sh in specs))
    write_weights(out_dir, specs, fmt=fmt, bits=bits, group_size=group_size, seed=seed,
                   dtype=torch.bfloat16, device=dev, max_shard_bytes=max_shard_bytes,
                   init=_chain_text_head(QWEN3VL_EMBED) if s.get("chain_head") else None)
    config.update(formats.get(fmt).fixture_config(group_size))
    write_json(os.path.join(out_dir, "config.json"), config)
    ids = qwen_special_ids(s["base_vocab"])
    write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "top_k": 20, "top_p": 0.8,
        "repetition_penalty": 1.0, "temperature": 0.7, "transformers_version": "4.57.0.dev0"})
    _write_qwen_tokenizer(out_dir, s["base_vocab"])
    _write_qwen3vl_processor(out_dir, s)
    return out_dir


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def write_default(out_dir: str) -> str:
    """The embedded default fixture: tiny Qwen3-VL, W4G128, format A (qat-sidecar), seed 0."""
    return write_qwen3vl(out_dir, size="tiny", fmt="qat-sidecar", bits=4, seed=0)


# =============================================================================================
# LLaVA-1.5, original layout (LlavaLlamaForCausalLM) + CLIP vision tower
# =============================================================================================

LLAVA_SIZES_SPEC = {
    # LLaVA-1.5-7B (Vicuna-7B v1.5) + openai/clip-vit-large-patch14-336.
    "7b": dict(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, max_pos=4096,
               clip=dict(hidden=1024, intermediate=4096, layers=24, heads=16, image=336, patch=14,
                         t_hidden=768, t_intermediate=3072, t_layers=12, t_heads=12, proj=768)),
    # Tiny: same TP=2 / group-128 constraints as the tiny Qwen3-VL; CLIP at 224 px -> 16x16 = 256
    # image tokens.
    "tiny": dict(vocab=1024, hidden=256, intermediate=512, layers=4, heads=4, kv_heads=4, max_pos=4096,
                 clip=dict(hidden=128, intermediate=512, layers=3, heads=2, image=224, patch=14,
                           t_hidden=64, t_intermediate=256, t_layers=2, t_heads=2, proj=64)),
}
LLAVA_CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"


def llava_config(size: str = "tiny", dtype: str = "bfloat16",
                 mm_vision_tower: str = LLAVA_CLIP_HUB_ID) -> dict:
    """config.json of an original-layout LLaVA-1.5 checkpoint (Llama fields at the top level)."""
    if size not in LLAVA_SIZES_SPEC:
        raise ValueError(f"size must be one of {tuple(LLAVA_SIZES_SPEC)}, got {size!r}")
    s = LLAVA_SIZES_SPEC[size]
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "max_length": 4096,
        "max_position_embeddings": s["max_pos"],
        "mm_hidden_size": s["clip"]["hidden"],
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": mm_vision_tower,
        "model_type": "llava",
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv_heads"],
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": s["vocab"],
    }


def llava_tensor_specs(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names/shapes of the original LLaVA layout, in the order its state_dict lists them."""
    s = LLAVA_SIZES_SPEC[size]
    h, i, v = s["hidden"], s["intermediate"], s["vocab"]
    hd = h // s["heads"]
    kv = s["kv_heads"] * hd
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        specs += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i)),
                  (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    specs.append(("model.norm.weight", (h,)))
    mm = s["clip"]["hidden"]
    specs += [("model.mm_projector.0.weight", (h, mm)), ("model.mm_projector.0.bias", (h,)),
              ("model.mm_projector.2.weight", (h, h)), ("model.mm_projector.2.bias", (h,))]
    specs.append(("lm_head.weight", (v, h)))
    return specs


@functools.lru_cache(maxsize=4)
def _llama_sentencepiece_model(vocab_size: int) -> bytes:
    """A Llama-style SentencePiece BPE model (<unk>=0, <s>=1, </s>=2, 256 byte pieces, then merges),
    trained on a small corpus and padded with UNUSED pieces (never emitted) to ``vocab_size``."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_writer=buf, vocab_size=min(vocab_size, 1024),
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", hard_vocab_limit=False, allow_whitespace_only_pieces=True,
        minloglevel=2, num_threads=1)
    m = pb.ModelProto()
    m.ParseFromString(buf.getvalue())
    if len(m.pieces) > vocab_size:
        raise RuntimeError(f"trained SentencePiece vocabulary {len(m.pieces)} exceeds {vocab_size}")
    low = min(p.score for p in m.pieces) - 1.0
    for k in range(len(m.pieces), vocab_size):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"<unused_{k}>", low, pb.ModelProto.SentencePiece.UNUSED
    m.trainer_spec.vocab_size = vocab_size
    return m.SerializeToString()


def _write_llama_tokenizer(out_dir: str, vocab_size: int) -> None:
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(_llama_sentencepiece_model(vocab_size))
    tok = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": False,  # noqa: E731
                     "rstrip": False, "single_word": False}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": tok("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": tok("</s>"), "legacy": False,
        "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": tok("<unk>")})
    write_json(os.path.join(out_dir, "special_tokens_map.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"})


def write_llava(out_dir: str, *, size: str = "tiny", fmt: str = "qat-sidecar", bits: int = 4, seed: int = 0,
                group_size: int = DEFAULT_GROUP_SIZE, device: str | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, mm_vision_tower: str = LLAVA_CLIP_HUB_ID,
                tower_specs: list[tuple[str, tuple[int, ...]]] = (), tower_config: dict | None = None) -> str:
    """Write a synthetic LLaVA-1.5 GRACE checkpoint in the original LLaVA layout, without a vision
    tower as the release (``mm_vision_tower`` names it). A tower written with it (the tests') comes
    as ``tower_specs`` (its tensors, written before ``lm_head``) and ``tower_config`` (config.json
    entries that describe them), or as a directory named by ``mm_vision_tower``.
    QAT formats are BF16 (as GRACE trains); ``plain`` and ``awq`` keep LLaVA's FP16.
    """
    _check_args(fmt, bits, group_size)
    if size not in LLAVA_SIZES_SPEC:
        raise ValueError(f"size must be one of {tuple(LLAVA_SIZES_SPEC)}, got {size!r}")
    os.makedirs(out_dir, exist_ok=True)
    dtype = torch.bfloat16 if formats.get(fmt).grid_weights else torch.float16   # QAT: BF16 as GRACE trains
    specs = llava_tensor_specs(size)
    specs = specs[:-1] + list(tower_specs) + specs[-1:]
    dev = pick_device(device, sum(numel(sh) for _, sh in specs))
    write_weights(out_dir, specs, fmt=fmt, bits=bits, group_size=group_size, seed=seed, dtype=dtype,
                   device=dev, max_shard_bytes=max_shard_bytes)
    config = llava_config(size, "float16" if dtype == torch.float16 else "bfloat16", mm_vision_tower)
    config.update(tower_config or {})
    config.update(formats.get(fmt).fixture_config(group_size))
    write_json(os.path.join(out_dir, "config.json"), config)
    write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
                 "transformers_version": "4.31.0"})
    _write_llama_tokenizer(out_dir, LLAVA_SIZES_SPEC[size]["vocab"])
    return out_dir
