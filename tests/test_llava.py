"""LLaVA-1.5 in its original layout (``LlavaLlamaForCausalLM``) on the real vLLM engine, no mocks.

Engine results are checked against the independent reference in ``tests/llava_reference.py`` (plain
Transformers/torch modules and SentencePiece on the same checkpoint files; float32):
  * tiny plain (FP16, CLIP directory through ``hf_overrides``) and AWQ W4 (CLIP inside the checkpoint)
    checkpoints, one offline engine each, sharing one subprocess: prompt token ids (from text, from
    token ids, from the default chat template) equal LLaVA's tokenization, and the log-probs of the
    first generated tokens match the reference for the right image (and not for the other one);
  * a QAT-grid + sidecar W4 checkpoint served by ``vllm serve --quantization grace_qat`` and asked over
    HTTP (/v1/chat/completions, image data URL, default chat template), CLIP from a Hugging Face cache.
Unit tests (no engine) cover the config translation, the CLIP lookup and its error, the tokenization
and image preprocessing, and the weight-name mapping seen by grace_qat.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from requires import require  # noqa: E402

torch = require("torch")

from llava_reference import (CLIP_HUB_ID, QUESTION, check_engine, check_http,  # noqa: E402
                             engine_jobs, image, reference_ids, reference_pixels,
                             run_jobs_in_subprocess, write_checkpoints)


def _need_vllm():
    require("vllm")
    require("sentencepiece")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    _need_vllm()
    return write_checkpoints(tmp_path_factory.mktemp("llava"))


# -- unit level: config, lookup, tokenization, preprocessing (no engine) -------------------------

@pytest.fixture(scope="module")
def registered():
    _need_vllm()
    import grace_vllm
    grace_vllm.register()


def test_config_translation(ckpts, registered):
    from transformers import AutoConfig, AutoTokenizer, LlavaConfig
    from grace_vllm.llava_config import LlavaOriginalConfig
    with open(os.path.join(ckpts["awq"], "config.json")) as f:
        flat = json.load(f)
    cfg = AutoConfig.from_pretrained(ckpts["awq"])
    assert type(cfg) is LlavaOriginalConfig and cfg.model_type == "llava_llama"
    assert cfg.architectures == ["LlavaLlamaForCausalLM"]
    t = cfg.text_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(t, key) == flat[key], key
    assert t.model_type == "llama" and t.architectures == ["LlamaForCausalLM"] and not t.tie_word_embeddings
    v = cfg.vision_config   # inline tower: described by mm_vision_tower_config
    assert (v.hidden_size, v.image_size, v.patch_size, v.num_hidden_layers) == (128, 224, 14, 3)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.image_token_index == 0 and cfg.projector_hidden_act == "gelu"
    # Hub id not in any cache: CLIP ViT-L/14-336, the tower of the LLaVA-1.5 releases
    cfg = AutoConfig.from_pretrained(ckpts["plain"])
    assert (cfg.vision_config.hidden_size, cfg.vision_config.image_size) == (1024, 336)
    # vLLM applies --hf-overrides with update(): the tower and the text settings follow
    cfg.update({"mm_vision_tower": ckpts["plain_clip"], "max_position_embeddings": 2048})
    assert (cfg.vision_config.hidden_size, cfg.vision_config.image_size) == (128, 224)
    assert cfg.text_config.max_position_embeddings == 2048
    assert "_flat_ready" not in cfg.to_dict()
    # pickled to vLLM's workers
    again = pickle.loads(pickle.dumps(cfg))
    assert type(again) is LlavaOriginalConfig and again.vision_config.image_size == 224
    # SentencePiece-faithful Llama tokenizer (Transformers would pick a generic one for "llava")
    tok = AutoTokenizer.from_pretrained(ckpts["plain"])
    assert type(tok).__name__ == "LlamaTokenizer"
    # a Transformers-layout LLaVA config is untouched
    hf_dir = os.path.join(ckpts["root"], "llava_hf_config")
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(LlavaConfig().to_dict(), f)
    assert type(AutoConfig.from_pretrained(hf_dir)) is LlavaConfig


def test_clip_lookup(ckpts, registered, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoConfig
    from grace_qat.errors import GraceFormatError
    from grace_qat.settings import CLIP_PATH as CLIP_ENV
    from grace_vllm.llava_config import find_clip_dir, vision_tower_weights_dir
    monkeypatch.delenv(CLIP_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", ckpts["hf_cache"])
    # Hub id through the Hugging Face cache; a local directory as is
    assert find_clip_dir(CLIP_HUB_ID)[0] == ckpts["qat_clip"]
    assert find_clip_dir(ckpts["plain_clip"])[0] == ckpts["plain_clip"]
    assert vision_tower_weights_dir(ckpts["qat"], CLIP_HUB_ID) == ckpts["qat_clip"]
    assert AutoConfig.from_pretrained(ckpts["qat"]).vision_config.image_size == 224
    # weights inside the checkpoint win
    assert vision_tower_weights_dir(ckpts["awq"], CLIP_HUB_ID) is None
    # the environment override
    monkeypatch.setenv(CLIP_ENV, ckpts["plain_clip"])
    assert vision_tower_weights_dir(ckpts["qat"], CLIP_HUB_ID) == ckpts["plain_clip"]
    assert AutoConfig.from_pretrained(ckpts["plain"]).vision_config.image_size == 224
    # missing: one line naming what was looked for
    monkeypatch.setenv(CLIP_ENV, "/nonexistent/clip")
    with pytest.raises(GraceFormatError, match=r"GRACE_CLIP_PATH=/nonexistent/clip") as e:
        vision_tower_weights_dir(ckpts["qat"], CLIP_HUB_ID)
    assert "\n" not in str(e.value)
    monkeypatch.delenv(CLIP_ENV)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(ckpts["root"], "empty_cache"))
    with pytest.raises(GraceFormatError) as e:
        vision_tower_weights_dir(ckpts["qat"], CLIP_HUB_ID)
    msg = str(e.value)
    assert "\n" not in msg and CLIP_HUB_ID in msg and "empty_cache" in msg and CLIP_ENV in msg, msg


def test_tokenization_and_preprocessing_match_llava(ckpts, registered):
    from transformers import AutoConfig, AutoTokenizer
    from llava_fixtures import llava_prompt
    from grace_vllm.llava import LlavaOriginalProcessor
    cfg = AutoConfig.from_pretrained(ckpts["awq"])
    tok = AutoTokenizer.from_pretrained(ckpts["awq"])
    proc = LlavaOriginalProcessor(cfg, tok)
    for prompt in (llava_prompt(QUESTION), "<image>\nDescribe.", "Two: <image> and <image>, done",
                   llava_prompt("Line one.\nLine two  (double space), digits 12345 ok?")):
        want = reference_ids(ckpts["awq"], prompt, 1, cfg.image_token_index)
        assert proc.tokenize(prompt) == want, prompt
        # vLLM >= 0.32 hands over the prompt tokenized in one piece, with or without BOS
        whole = tok(prompt).input_ids
        assert whole != want
        assert proc.retokenize(whole) == want
        assert proc.retokenize(whole[1:]) == want[1:]
    # the vicuna_v1 chat template renders LLaVA's prompt; its token ids come out right too
    from grace_vllm.llava_config import CHAT_TEMPLATE
    rendered = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + QUESTION}],
                                       chat_template=CHAT_TEMPLATE.read_text(), tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<s> " + llava_prompt(QUESTION)
    chat_ids = tok(rendered, add_special_tokens=False).input_ids
    want = reference_ids(ckpts["awq"], llava_prompt(QUESTION), 1, cfg.image_token_index)
    assert proc.retokenize(chat_ids) == want
    # the rendered text itself, asked with or without special tokens (vLLM 0.26's LLM.chat asks
    # with, its server without): one BOS either way, as LLaVA had (a double BOS was seen on 0.26)
    assert proc.tokenize(rendered, add_bos=True) == proc.tokenize(rendered, add_bos=False) == want
    assert proc(text=rendered, add_special_tokens=True)["input_ids"] == [want]
    text_only = tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                            chat_template=CHAT_TEMPLATE.read_text(),
                                            add_generation_prompt=True), add_special_tokens=False)
    assert text_only.input_ids == reference_ids(ckpts["awq"], llava_prompt("Hi").replace(
        "<image>\n", ""), 0, 0)
    # images: padding colour, resize, crop, normalisation
    for kind in ("gradient", "checker"):
        got = proc(images=[image(kind)])["pixel_values"]
        want = reference_pixels(image(kind), 224)
        assert got.shape == want.shape == (1, 3, 224, 224)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_weight_names_and_quantized_modules(ckpts, registered):
    """Every checkpoint tensor maps onto vLLM's LLaVA; grace_qat sees exactly the LM linears."""
    from safetensors import safe_open
    from grace_vllm.config import GraceQATConfig
    from grace_vllm.llava import LlavaLlamaForCausalLM as Llava
    mapper = Llava.hf_to_vllm_mapper
    map_name = getattr(mapper, "map_name", None) or mapper._map_name     # vLLM 0.32+ / 0.26
    with safe_open(os.path.join(ckpts["awq"], "model.safetensors"), "pt") as f:
        names = list(f.keys())
    mapped = {n: map_name(n) for n in names}
    assert all(m.startswith(("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                             "multi_modal_projector.linear_")) for m in mapped.values()), mapped
    assert mapped["model.mm_projector.2.weight"] == "multi_modal_projector.linear_2.weight"
    assert mapped["lm_head.weight"] == "language_model.lm_head.weight"
    assert mapped["model.layers.3.mlp.down_proj.qweight"] == (
        "language_model.model.layers.3.mlp.down_proj.qweight")
    assert map_name("vision_tower.text_model.encoder.layers.0.mlp.fc1.weight") is None
    assert map_name("vision_tower.logit_scale") is None
    assert map_name("vision_tower.vision_model.embeddings.position_ids") is None
    for kind in ("qat", "awq"):
        cfg = GraceQATConfig()
        cfg.maybe_update_config(ckpts[kind])
        cfg.apply_vllm_mapper(mapper.get_rename_mapper() if hasattr(mapper, "get_rename_mapper")
                              else mapper.get_unstacked_mapper())
        cfg.packed_modules_mapping = Llava.packed_modules_mapping
        assert len(cfg.modules) == 4 * 7
        assert cfg.checkpoint_modules("language_model.model.layers.2.self_attn.qkv_proj") == [
            f"model.layers.2.self_attn.{p}_proj" for p in "qkv"]
        assert cfg.checkpoint_modules("language_model.model.layers.0.mlp.gate_up_proj") == [
            "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
        for prefix in ("multi_modal_projector.linear_1", "vision_tower.vision_model.encoder.layers.0.mlp.fc1",
                       "vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj"):
            assert cfg.checkpoint_modules(prefix) is None, prefix


# -- whole engines -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(ckpts, tmp_path_factory):
    return run_jobs_in_subprocess(engine_jobs(ckpts), tmp_path_factory.mktemp("llava_engines"))


@pytest.mark.engine
@pytest.mark.parametrize("kind,clip", [("plain", "plain_clip"), ("awq", None)])
def test_engine_matches_reference(ckpts, engines, kind, clip):
    print(check_engine(ckpts, engines[kind], kind, clip))


@pytest.mark.engine
def test_http_chat_with_image_qat_sidecar(ckpts):
    print(check_http(ckpts))


def test_cache_clip_puts_the_release_tower_where_transformers_finds_it_offline(tmp_path):
    """The GPU serve stage's CLIP (``llava_fixtures.cache_clip``): in an empty Hugging Face cache,
    Transformers' own offline resolution of the release's hub id (what stock SGLang's LLaVA calls)
    loads it, the plugin's lookup finds the same snapshot, and a second call writes nothing."""
    require("transformers")
    code = (
        "import json, os, sys; sys.path.insert(0, 'tests')\n"
        "import llava_fixtures\n"
        "from transformers import CLIPVisionModel\n"
        "from grace_qat.llava_hf import find_clip_dir\n"
        "snap = llava_fixtures.cache_clip('tiny')\n"
        "files = sorted(os.listdir(snap)); stamp = os.stat(os.path.join(snap, 'config.json')).st_mtime_ns\n"
        f"tower = CLIPVisionModel.from_pretrained({CLIP_HUB_ID!r})\n"
        "again = llava_fixtures.cache_clip('tiny')\n"
        "print(json.dumps({'snap': snap, 'again': again, 'files': files, 'found': find_clip_dir("
        f"{CLIP_HUB_ID!r})[0], 'rewritten': os.stat(os.path.join(again, 'config.json')).st_mtime_ns != stamp, "
        "'size': tower.config.image_size, 'hidden': tower.config.hidden_size}))\n")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("GRACE_CLIP_PATH", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["snap"].startswith(str(tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14-336"))
    assert got["again"] == got["found"] == got["snap"] and not got["rewritten"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(got["files"])
    assert (got["size"], got["hidden"]) == (224, 128)      # the tiny tower written, not another one
