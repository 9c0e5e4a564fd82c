"""The bundle's smoke test on the GPU machine: the engine's start-up path, not only its imports.

install.sh runs this once the bundle is unpacked (``python3 smoke.py ENGINE``). It imports what a
server imports (the OpenAI-compatible API server; SGLang 0.5.23's imports soundfile), writes a tiny
random Llama (no tokenizer: token ids in, token ids out), starts the engine with its default settings
(torch.compile, CUDA graphs, kernel warm-up: vLLM 0.34 imports its CuTe-DSL warm-ups there, SGLang
0.5.23's Llama MLP imports CuTe DSL when built) and generates four tokens. An engine that cannot
start or generate fails the install, so /tmp/site-ENGINE.done is never written.
Stand-alone on purpose: it runs from the bundle's folder, beside no project code.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time


def tiny_llama(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      torch_dtype="bfloat16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)


def vllm_generate(path: str) -> list[int]:
    import vllm.entrypoints.openai.api_server  # noqa: F401  (what `vllm serve` imports)
    from vllm import LLM, SamplingParams
    llm = LLM(model=path, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=4,
              gpu_memory_utilization=0.25)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}],
                       SamplingParams(max_tokens=4, temperature=0.0, detokenize=False))
    return list(out[0].outputs[0].token_ids)


def sglang_generate(path: str) -> list[int]:
    import sgl_kernel  # noqa: F401
    import sglang
    import sglang.srt.entrypoints.http_server  # noqa: F401  (what `sglang.launch_server` imports)
    engine = sglang.Engine(model_path=path, skip_tokenizer_init=True, mem_fraction_static=0.25,
                           context_length=256, attention_backend="triton")
    try:
        out = engine.generate(input_ids=[1, 2, 3, 4, 5], sampling_params={"max_new_tokens": 4, "temperature": 0})
        return list(out["output_ids"])
    finally:
        engine.shutdown()


def main() -> int:
    engine = sys.argv[1] if len(sys.argv) > 1 else "vllm"
    import importlib
    import torch
    mod = importlib.import_module(engine)
    print(engine, mod.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
    if not torch.cuda.is_available() or os.environ.get("BUNDLE_SMOKE_IMPORT_ONLY") == "1":
        print("no GPU here (or BUNDLE_SMOKE_IMPORT_ONLY=1): imports only")
        return 0 if os.environ.get("BUNDLE_SMOKE_IMPORT_ONLY") == "1" else 1
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        tiny_llama(d)
        ids = (vllm_generate if engine == "vllm" else sglang_generate)(d)
    if len(ids) != 4:
        print("smoke: the engine generated %r, expected 4 token ids" % (ids,))
        return 1
    print("smoke: %s started and generated %s in %.0f s" % (engine, ids, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
