"""Support for tests/test_llava.py (no pytest needed): the tiny original-layout LLaVA checkpoints,
an independent reference implementation of LLaVA-1.5, the vLLM engine runner and the engine checks.

The reference uses plain Transformers/torch modules on the checkpoint files: SentencePiece (the
``sentencepiece`` library on ``tokenizer.model``) tokenizing the prompt the way LLaVA's
``tokenizer_image_token`` does, the image padded to a square with the CLIP mean colour and run through
Transformers' PIL CLIP image processor, ``CLIPVisionModel`` hidden_states[-2] without CLS,
Linear-GELU-Linear, and ``LlamaForCausalLM`` fed ``inputs_embeds`` with the image features spliced in
at ``<image>``; AWQ weights unpacked here from the documented AutoAWQ layout. It runs in float32.

Standalone (e.g. on the GPU machine with vLLM 0.26, where pytest may be missing):

    python tests/llava_reference.py --check OUT_DIR      # every engine check; OUT_DIR/llava_check.json
"""
from __future__ import annotations

import base64
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_INT4_W4A8": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"
QUESTION = "What is in the image?"
IMAGE_TOKENS = 256          # tiny CLIP: (224 / 14) ** 2
MAX_TOKENS = 4
TOP_LOGPROBS = 5
# |vLLM - float32 reference| on log-probabilities: measured <= 0.005 on these fixtures (CPU, fp16 and
# bf16); the reference's own change between the two test images is >= 0.09 (checked too).
LOGPROB_TOL = 0.08
ENGINE_TIMEOUT_S = 1200


def image(kind: str):
    """Two small non-square test images (padding matters): a colour gradient and a checkerboard."""
    from PIL import Image
    w, h = (160, 120) if kind == "gradient" else (90, 150)
    img = Image.new("RGB", (w, h))
    if kind == "gradient":
        img.putdata([((x * 255) // w, (y * 255) // h, 128) for y in range(h) for x in range(w)])
    else:
        img.putdata([(250, 250, 20) if (x // 15 + y // 15) % 2 else (10, 60, 200)
                     for y in range(h) for x in range(w)])
    return img


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- checkpoints -------------------------------------------------------------------------------------

def _fake_hf_cache(root, clip_writer) -> str:
    """A Hugging Face hub cache holding ``openai/clip-vit-large-patch14-336`` (the tiny CLIP)."""
    cache = root / "hf_cache"
    repo = cache / ("models--" + CLIP_HUB_ID.replace("/", "--"))
    commit = "0" * 40
    clip_writer(str(repo / "snapshots" / commit))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return str(cache)


def write_checkpoints(root: Path) -> dict:
    """Tiny LLaVA-1.5 checkpoints (Llama 256 wide x 4 layers, vocab 1024; CLIP 224 px / patch 14):
      * plain FP16, ``mm_vision_tower`` = the Hub id; its CLIP directory is given by hf_overrides;
      * AWQ W4, the CLIP tower inside the checkpoint;
      * QAT grid + sidecar W4 (BF16), ``mm_vision_tower`` = the Hub id found in a Hugging Face cache."""
    from llava_fixtures import write_clip, write_llava
    d = {"root": str(root)}
    d["plain"] = write_llava(str(root / "plain"), fmt="plain", clip_dir=None)
    d["plain_clip"] = write_clip(str(root / "plain_clip"), seed=0)
    d["awq"] = write_llava(str(root / "awq"), fmt="awq", clip_dir="inline", seed=1)
    d["qat"] = write_llava(str(root / "qat"), fmt="qat-sidecar", clip_dir=None, seed=2)
    d["hf_cache"] = _fake_hf_cache(root, lambda p: write_clip(p, seed=2))
    d["qat_clip"] = os.path.join(d["hf_cache"], "models--" + CLIP_HUB_ID.replace("/", "--"),
                                 "snapshots", "0" * 40)
    for name in ("gradient", "checker"):
        d[name] = str(root / f"{name}.png")
        image(name).save(d[name])
    return d


# -- the independent reference -------------------------------------------------------------------------

def reference_ids(model_dir: str, prompt: str, n_image_tokens: int, image_id: int) -> list[int]:
    """LLaVA's tokenizer_image_token with SentencePiece itself: each chunk around <image> encoded on
    its own (with the dummy-prefix "▁"), BOS once, the image features between the chunks."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
    ids = [sp.bos_id()]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids += [image_id] * n_image_tokens
        ids += sp.encode(chunk)
    return ids


def reference_pixels(image, size: int) -> torch.Tensor:
    """LLaVA-1.5 "pad": expand2square with the CLIP mean colour, then the CLIP image processor (PIL)."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    mean = (0.48145466, 0.4578275, 0.40821073)
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc(square, return_tensors="pt")["pixel_values"]


def awq_dequant(qweight, qzeros, scales, group: int) -> torch.Tensor:
    """AutoAWQ GEMM: nibble k of int32 column c is output channel 8c + [0,2,4,6,1,3,5,7][k]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(packed):
        nib = (packed.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int32) * 4)) & 0xF
        out = torch.empty_like(nib)
        out[..., order] = nib
        return out.reshape(packed.shape[0], -1).float()

    u, z = unpack(qweight), unpack(qzeros).repeat_interleave(group, 0)
    return (scales.float().repeat_interleave(group, 0) * (u - z)).t().contiguous()   # (out, in)


class Reference:
    """LLaVA-1.5 with Transformers modules in float32 on the checkpoint's own tensors."""

    def __init__(self, model_dir: str, clip_dir: str | None):
        from safetensors.torch import load_file
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        sd = {}
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                sd.update(load_file(os.path.join(model_dir, name)))
        awq = cfg.get("awq_packing")
        for key in [k for k in sd if k.endswith(".qweight")]:
            base = key[: -len(".qweight")]
            sd[base + ".weight"] = awq_dequant(sd.pop(key), sd.pop(base + ".qzeros"),
                                                sd.pop(base + ".scales"), awq["group_size"])
        # CLIP: from the checkpoint if it is there, else from the CLIP directory
        tower = {k[len("model.vision_tower.vision_tower."):]: v for k, v in sd.items()
                 if k.startswith("model.vision_tower.vision_tower.")}
        if tower:
            vision_cfg = CLIPVisionConfig(**cfg["mm_vision_tower_config"])
        else:
            with open(os.path.join(clip_dir, "config.json")) as f:
                vision_cfg = CLIPVisionConfig(**json.load(f)["vision_config"])
            tower = {k: v for k, v in load_file(os.path.join(clip_dir, "model.safetensors")).items()
                     if k.startswith("vision_model.")}
        self.clip = CLIPVisionModel(vision_cfg).float().eval()
        if not any(k.startswith("vision_model.") for k in self.clip.state_dict()):   # Transformers 5
            tower = {k.removeprefix("vision_model."): v for k, v in tower.items()}
        missing, unexpected = self.clip.load_state_dict(tower, strict=False)
        assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
        self.image_size = vision_cfg.image_size
        h = cfg["hidden_size"]
        self.projector = torch.nn.Sequential(torch.nn.Linear(cfg["mm_hidden_size"], h), torch.nn.GELU(),
                                             torch.nn.Linear(h, h)).float().eval()
        self.projector.load_state_dict({k[len("model.mm_projector."):]: v for k, v in sd.items()
                                        if k.startswith("model.mm_projector.")})
        llama_cfg = LlamaConfig(
            vocab_size=cfg["vocab_size"], hidden_size=h, intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
            max_position_embeddings=cfg["max_position_embeddings"], hidden_act=cfg["hidden_act"],
            tie_word_embeddings=False)
        self.llm = LlamaForCausalLM(llama_cfg).float().eval()
        lm = {k: v for k, v in sd.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
        missing, unexpected = self.llm.load_state_dict(lm, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        self.model_dir = model_dir

    @torch.no_grad()
    def image_features(self, image, dtype: torch.dtype) -> torch.Tensor:
        # vLLM hands the tower pixels in the model's dtype: round them the same way
        pixels = reference_pixels(image, self.image_size).to(dtype).float()
        hidden = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return self.projector(hidden[:, 1:])[0]          # CLS dropped

    @torch.no_grad()
    def logprobs(self, ids: list[int], image, image_id: int, continuation: list[int],
                 dtype: torch.dtype) -> torch.Tensor:
        """log-softmax at the last prompt position and after each continuation token but the last."""
        feats = self.image_features(image, dtype)
        full = torch.tensor(ids + continuation[:-1])
        pos = (full == image_id).nonzero().flatten()
        assert len(pos) == feats.shape[0], (len(pos), feats.shape)
        embeds = self.llm.get_input_embeddings()(full).clone()
        embeds[pos] = feats
        logits = self.llm(inputs_embeds=embeds[None]).logits[0].float()
        return torch.log_softmax(logits[len(ids) - 1:], dim=-1)


def compare(ref: Reference, result: dict, image, dtype: torch.dtype) -> float:
    """Max |vLLM - reference| over the top log-probs vLLM reports at each generated step."""
    lp = ref.logprobs(result["prompt_token_ids"], image, 0, result["token_ids"], dtype)
    diffs = [abs(lp[step, int(tok)].item() - val)
             for step, top in enumerate(result["logprobs"]) for tok, val in top.items()]
    return max(diffs)


# -- the engine runner and the checks ------------------------------------------------------------------

def engine_jobs(ckpts: dict) -> list[dict]:
    """The offline engines: no --dtype (the checkpoints' FP16), CLIP via hf_overrides / in the checkpoint."""
    images = [ckpts["gradient"], ckpts["checker"]]
    return [
        {"name": "plain", "model": ckpts["plain"], "images": images,
         "hf_overrides": {"mm_vision_tower": ckpts["plain_clip"]}},
        {"name": "awq", "model": ckpts["awq"], "quantization": "grace_qat", "images": images},
    ]


def run_jobs(jobs: list[dict]) -> dict:
    """vLLM in this process (``uni`` executor), one engine after the other. Per engine: both images
    with LLaVA's prompt, one chat (the default template), and the multimodal processor called directly
    on the prompt as text and as token ids (vLLM 0.26 takes separate code paths for the two)."""
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from llava_fixtures import llava_prompt

    def record(o):
        return {"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]}

    results = {}
    for job in jobs:
        t0 = time.perf_counter()
        llm = LLM(job["model"], quantization=job.get("quantization"), hf_overrides=job.get("hf_overrides"),
                  max_model_len=1024, enforce_eager=True, distributed_executor_backend="uni", seed=0,
                  gpu_memory_utilization=0.3)      # GPU: engines in turn in one process
        start_s = time.perf_counter() - t0
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP_LOGPROBS)
        images = [Image.open(p).convert("RGB") for p in job["images"]]
        prompts = [{"prompt": llava_prompt(QUESTION), "multi_modal_data": {"image": im}} for im in images]
        outs = llm.generate(prompts, params)
        chat = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": images[0]},
                                                      {"type": "text", "text": QUESTION}]}], params)
        model_config = llm.llm_engine.model_config
        tokenizer = llm.get_tokenizer()
        processor = MULTIMODAL_REGISTRY.create_processor(model_config, tokenizer=tokenizer)
        items = processor.info.parse_mm_data({"image": images[:1]})
        prompt = llava_prompt(QUESTION)
        results[job["name"]] = {
            "start_s": start_s,
            "dtype": str(model_config.dtype),
            "runs": [record(o) for o in list(outs) + list(chat)],
            "processor": {"text": list(processor(prompt, items)["prompt_token_ids"]),
                          "tokens": list(processor(tokenizer.encode(prompt), items)["prompt_token_ids"])},
        }
        del llm, outs, chat, processor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def run_jobs_in_subprocess(jobs: list[dict], workdir: Path) -> dict:
    job_path, out_path = workdir / "jobs.json", workdir / "out.json"
    job_path.write_text(json.dumps(jobs))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", **ENGINE_ENV)
    env.pop("GRACE_CLIP_PATH", None)
    proc = subprocess.run([sys.executable, __file__, "--jobs", str(job_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out_path.read_text())


def check_engine(ckpts: dict, res: dict, kind: str, clip: str | None) -> str:
    """Asserts on one offline engine's results; returns a summary line."""
    from llava_fixtures import llava_prompt
    assert res["dtype"] == "torch.float16", res["dtype"]     # the checkpoint's own (LLaVA's FP16)
    ref = Reference(ckpts[kind], ckpts[clip] if clip else None)
    want_ids = reference_ids(ckpts[kind], llava_prompt(QUESTION), IMAGE_TOKENS, 0)
    gradient, checker, chat = res["runs"]
    # the prompt exactly as LLaVA tokenizes it: from text, from token ids, from the chat template
    assert gradient["prompt_token_ids"] == want_ids
    assert checker["prompt_token_ids"] == want_ids
    assert res["processor"]["text"] == want_ids and res["processor"]["tokens"] == want_ids
    assert chat["prompt_token_ids"] == want_ids and chat["token_ids"] == gradient["token_ids"]
    # log-probs of the first generated tokens agree with the reference, for the right image only
    lines = []
    for run, img, other in ((gradient, image("gradient"), image("checker")),
                            (checker, image("checker"), image("gradient"))):
        err = compare(ref, run, img, torch.float16)
        wrong = compare(ref, run, other, torch.float16)
        assert err < LOGPROB_TOL and wrong > 3 * err, (kind, err, wrong)
        lines.append(f"{err:.4f} (other image {wrong:.4f})")
    return f"{kind}: max |logprob - reference| {', '.join(lines)}; engine start {res['start_s']:.1f} s"


def check_http(ckpts: dict, log_dir: str | None = None) -> str:
    """``vllm serve <qat dir> --quantization grace_qat`` and nothing else (CLIP from the Hugging Face
    cache, the default chat template): one image chat over HTTP, checked against the reference."""
    from llava_fixtures import llava_prompt
    from grace_qat.vllm_server import VLLMServer
    img = image("gradient")
    server = VLLMServer(ckpts["qat"], ["--quantization", "grace_qat"],
                        env=dict(ENGINE_ENV, HF_HUB_CACHE=ckpts["hf_cache"]), startup_timeout=600,
                        log_path=os.path.join(log_dir, "vllm_serve.log") if log_dir else None)
    for key in ("GRACE_CLIP_PATH", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        server.env.pop(key, None)
    with server:
        reply = server.chat(QUESTION, data_url(img), max_tokens=MAX_TOKENS, logprobs=True,
                            top_logprobs=TOP_LOGPROBS, return_tokens_as_token_ids=True,
                            return_token_ids=True)
        log = server.log()
    assert "grace_qat" in log and "LlavaLlamaForCausalLM" in log
    want_ids = reference_ids(ckpts["qat"], llava_prompt(QUESTION), IMAGE_TOKENS, 0)
    assert reply["prompt_token_ids"] == want_ids           # the default template + LLaVA tokenization
    assert reply["usage"]["prompt_tokens"] == len(want_ids)
    content = reply["choices"][0]["logprobs"]["content"]
    result = {"prompt_token_ids": want_ids,
              "token_ids": [int(c["token"].split(":")[1]) for c in content],
              "logprobs": [{t["token"].split(":")[1]: t["logprob"] for t in c["top_logprobs"]}
                           for c in content]}
    assert len(result["token_ids"]) == MAX_TOKENS
    ref = Reference(ckpts["qat"], ckpts["qat_clip"])
    err = compare(ref, result, img, torch.bfloat16)
    wrong = compare(ref, result, image("checker"), torch.bfloat16)
    assert err < LOGPROB_TOL and wrong > 3 * err, ("qat over HTTP", err, wrong)
    return (f"qat-sidecar over HTTP: max |logprob - reference| {err:.4f} (other image {wrong:.4f}); "
            f"server up in {server.startup_s:.1f} s")


def _check_all(out_dir: str) -> int:
    """Everything the engine tests check, without pytest; a JSON summary in OUT_DIR."""
    import traceback

    import vllm
    os.makedirs(out_dir, exist_ok=True)
    summary = {"vllm": vllm.__version__, "checks": {}}
    ckpts = write_checkpoints(Path(tempfile.mkdtemp(prefix="llava_check_")))
    engines = {}
    checks = {
        "engines": lambda: engines.update(run_jobs_in_subprocess(engine_jobs(ckpts), Path(ckpts["root"])))
        or "offline engines ran",
        "plain": lambda: check_engine(ckpts, engines["plain"], "plain", "plain_clip"),
        "awq": lambda: check_engine(ckpts, engines["awq"], "awq", None),
        "http": lambda: check_http(ckpts, out_dir),
    }
    for name, check in checks.items():
        try:
            line = check()
            summary["checks"][name] = {"ok": True, "summary": line}
        except Exception as e:   # run and report every check
            line = f"FAILED {type(e).__name__}: {str(e)[-2000:]}"
            summary["checks"][name] = {"ok": False, "error": line,
                                       "traceback": traceback.format_exc()[-4000:]}
        print(f"[llava check] {name}: {line}", flush=True)
    summary["engines"] = engines
    with open(os.path.join(out_dir, "llava_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0 if all(c["ok"] for c in summary["checks"].values()) else 1


if __name__ == "__main__":
    if sys.argv[1] == "--jobs":          # the engine runner (run_jobs_in_subprocess)
        with open(sys.argv[2]) as f:
            out = run_jobs(json.load(f))
        with open(sys.argv[3], "w") as f:
            json.dump(out, f)
    elif sys.argv[1] == "--check":
        sys.exit(_check_all(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} --check OUT_DIR | --jobs JOBS.json OUT.json")
