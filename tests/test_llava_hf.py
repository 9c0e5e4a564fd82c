"""grace-qat convert --layout llava-hf: the original-layout LLaVA-1.5 checkpoints in the llava-hf
layout, loaded by stock Transformers (``LlavaForConditionalGeneration`` + ``LlavaProcessor``) and
checked against the independent float32 reference of tests/llava_reference.py on the source files."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from requires import require  # noqa: E402

torch = require("torch")
transformers = require("transformers")
require("sentencepiece")

from llava_reference import Reference, image, reference_ids, reference_pixels  # noqa: E402

from grace_qat.convert import convert  # noqa: E402
from llava_fixtures import llava_prompt, write_clip, write_llava  # noqa: E402

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_hf")
    d = {"awq": write_llava(str(root / "awq"), fmt="awq", clip_dir="inline", seed=1),
         "qat": write_llava(str(root / "qat"), fmt="qat-sidecar", clip_dir=None, seed=2),
         "clip": write_clip(str(root / "clip"), seed=2)}
    d["awq_hf"] = str(root / "awq_hf")
    convert(d["awq"], d["awq_hf"], to="bf16", layout="llava-hf")
    d["qat_hf_gptq"] = str(root / "qat_hf_gptq")
    convert(d["qat"], d["qat_hf_gptq"], to="gptq", layout="llava-hf", clip_dir=d["clip"])
    d["qat_hf"] = str(root / "qat_hf")
    convert(d["qat"], d["qat_hf"], to="bf16", layout="llava-hf", clip_dir=d["clip"])
    return d


@pytest.mark.parametrize("src,out,clip", [("awq", "awq_hf", None), ("qat", "qat_hf", "clip")])
def test_transformers_llava_matches_the_reference(ckpts, src, out, clip):
    """Stock LlavaForConditionalGeneration on the export gives the reference's log-probabilities
    (float32 both; the export stores bf16 weights), at the prompt's end and along a continuation."""
    from transformers import LlavaForConditionalGeneration
    model, info = LlavaForConditionalGeneration.from_pretrained(ckpts[out], dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    cfg = json.load(open(os.path.join(ckpts[src], "config.json")))
    vocab = cfg["vocab_size"]
    ref = Reference(ckpts[src], ckpts[clip] if clip else None)
    side, patch = ref.image_size, model.config.vision_config.patch_size
    n_img = (side // patch) ** 2
    img = image("checker")
    prompt = llava_prompt(QUESTION)
    continuation = [17, 250, 3]
    want = ref.logprobs(reference_ids(ckpts[src], prompt, n_img, 0), img, 0, continuation, torch.float32)
    ids = reference_ids(ckpts[src], prompt, n_img, vocab) + continuation[:-1]     # <image> = vocab
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=reference_pixels(img, side)).logits[0]
    got = torch.log_softmax(logits[len(ids) - len(continuation):, :vocab].float(), dim=-1)
    err = (got - want).abs().max().item()
    print(f"\n{src} -> llava-hf: max |logprob - reference| {err:.4f}")
    assert err < 0.01, err          # seen: 0.0005; a wrong vision_feature_layer gives 0.06
    # the two added ids behave like <unk> (id 0): same logit
    assert torch.allclose(logits[:, vocab:vocab + 2], logits[:, :1].expand(-1, 2))


def test_processor_pads_like_llava_and_expands_the_image_token(ckpts):
    """LlavaProcessor from the export: LLaVA-1.5's "pad" preprocessing (the reference's pixels) and
    one <image> token per patch in the prompt."""
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(ckpts["awq_hf"])
    img = image("checker")                                    # 90 x 150: padding matters
    cfg = json.load(open(os.path.join(ckpts["awq_hf"], "config.json")))
    side = cfg["vision_config"]["image_size"]
    out = proc(images=img, text=llava_prompt(QUESTION), return_tensors="pt")
    diff = (out["pixel_values"] - reference_pixels(img, side)).abs()
    # equal up to one grey level (1/255 over CLIP's std) at a handful of edge pixels
    assert diff.max().item() <= 1.01 / 255 / 0.2613, diff.max().item()
    assert (diff > 1e-4).float().mean().item() < 1e-3
    n_img = (side // cfg["vision_config"]["patch_size"]) ** 2
    assert int((out["input_ids"][0] == cfg["image_token_index"]).sum()) == n_img
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_index"]


def test_gptq_export_names_and_config(ckpts):
    from ckpt_files import load_all_tensors
    cfg = json.load(open(os.path.join(ckpts["qat_hf_gptq"], "config.json")))
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    mods = cfg["quantization_config"]["modules_in_block_to_quantize"]
    assert mods and all(m.startswith("language_model.model.layers.") for m in mods)
    names = set(load_all_tensors(ckpts["qat_hf_gptq"]))
    for m in mods:
        assert {f"{m}.qweight", f"{m}.scales", f"{m}.qzeros"} <= names
    assert any(n.startswith("vision_tower.vision_model.") for n in names)     # from --clip-dir
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight",
            "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"} <= names
    assert not any(n.startswith(("model.", "lm_head")) for n in names)


def test_llava_hf_layout_errors_name_what_is_missing(ckpts, tmp_path):
    from grace_qat.errors import GraceFormatError
    with pytest.raises(GraceFormatError, match="CLIP tower.*--clip-dir"):
        convert(ckpts["qat"], str(tmp_path / "x"), to="gptq", layout="llava-hf")
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(GraceFormatError, match="original-layout LLaVA"):
        convert(ckpts["awq_hf"].replace("awq_hf", "awq"), str(tmp_path / "y"), to="grace_qat", layout="llava-hf")


@pytest.mark.engine
def test_stock_vllm_serves_the_llava_hf_export(ckpts, tmp_path):
    """Stock vLLM (its own LlavaForConditionalGeneration, no quantization flag) on the BF16 llava-hf
    export: 256 image tokens per image, and the log-probabilities it reports match the reference on
    the source checkpoint for the very prompt ids vLLM built, from text prompts and from a chat."""
    require("vllm")
    from llava_reference import LOGPROB_TOL, compare, run_jobs_in_subprocess
    paths = []
    for kind in ("gradient", "checker"):
        paths.append(str(tmp_path / f"{kind}.png"))
        image(kind).save(paths[-1])
    res = run_jobs_in_subprocess([{"name": "hf", "model": ckpts["awq_hf"], "images": paths}], tmp_path)["hf"]
    vocab = json.load(open(os.path.join(ckpts["awq"], "config.json")))["vocab_size"]
    ref = Reference(ckpts["awq"], None)
    dtype = getattr(torch, res["dtype"].split(".")[-1])
    worst = 0.0
    for run, kind in zip(res["runs"], ("gradient", "checker", "gradient")):   # 2 prompts + 1 chat
        ids = run["prompt_token_ids"]
        assert ids.count(vocab) == 256, ids.count(vocab)
        mapped = [0 if t == vocab else t for t in ids]
        worst = max(worst, compare(ref, {**run, "prompt_token_ids": mapped}, image(kind), dtype))
    print(f"\nstock vLLM on the llava-hf export ({res['dtype']}): max |logprob - reference| {worst:.4f}")
    assert worst < LOGPROB_TOL, worst
