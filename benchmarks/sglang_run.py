"""Run ONE SGLang system on one checkpoint and print the same RESULT line as vllm_run.py: load
time, greedy tokens of an image+text prompt, decode tokens/s per batch size (token-id prompts).

    python benchmarks/sglang_run.py --model DIR [--quantization grace_qat|none] --batches 1,8,32

``--quantization none`` serves stock SGLang with the grace_qat plugin switched off (SGLANG_PLUGINS
set to a name no plugin has), e.g. on the ``grace-qat convert --to gptq`` export. Each system runs in
its own process (benchmarks/vllm_bench.py drives several).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "gpu"))
from vllm_run import _image_data_url, emit_result, prompt_ids, scoring_ids, short_prompts, steady_decode  # noqa: E402

DISABLED_PLUGINS = "__grace_qat_disabled__"
STOCK = ("none", "humming")     # --quantization values that run stock SGLang, the plugin switched off


def _decode_tps(engine, batch: int, prompt_len: int, out_len: int, vocab: int) -> dict:
    """Decode tokens/s as vllm_run defines it (steady_decode), on the same token-id prompts."""
    ids = prompt_ids(batch, prompt_len, vocab)

    def timed(n):
        sp = {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True}
        t = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params=sp)
        return time.perf_counter() - t

    return dict(steady_decode(timed, batch, out_len), prompt="text")


def _input_logprobs(reply: dict) -> list[float | None]:
    """The teacher-forced log-prob of each prompt token in a ``return_logprob`` reply (None first)."""
    return [None if lp is None else float(lp) for lp, *_ in reply["meta_info"].get("input_token_logprobs") or []]


def expose_entry_point() -> None:
    """SGLang finds plugins only through their ``sglang.srt.plugins`` entry points (in this process and
    in its scheduler processes); where this repository is not pip-installed, the serve checks' shim
    (``sglang_serve_check.ensure_entry_point``) goes on sys.path and PYTHONPATH. Without it a grace_qat
    run failed in SGLang's argument checks ("Unknown quantization method", H100, 2026-12-07)."""
    import importlib
    import tempfile

    from sglang_serve_check import ensure_entry_point
    eps = ensure_entry_point(tempfile.mkdtemp(prefix="sglang_run_"))
    if eps is not None:
        sys.path.insert(0, eps)
        os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (eps, os.environ.get("PYTHONPATH")) if x)
        importlib.invalidate_caches()


def engine_kwargs(args) -> dict:
    """sglang.Engine's arguments for one system: no radix (prefix) cache (the timed runs repeat the same
    prompts, which would otherwise be cached), triton attention (no FA3 needed), and for stock SGLang on
    an original-layout LLaVA the image-token id the serve check gives it."""
    from sglang_serve_check import sglang_vision_attention, stock_llava_overrides   # tests/gpu
    kwargs = dict(model_path=args.model, tp_size=args.tp, random_seed=0, attention_backend="triton",
                  mem_fraction_static=0.7, context_length=2048, max_running_requests=128, log_level="info",
                  disable_radix_cache=True, **sglang_vision_attention())
    if args.quantization not in (None, "none"):
        kwargs["quantization"] = args.quantization
    if args.quantization in STOCK:
        kwargs.update(stock_llava_overrides(args.model))
    if args.tokenizer_path:
        kwargs["tokenizer_path"] = args.tokenizer_path
    if args.eager:
        kwargs["disable_cuda_graph"] = True
    return kwargs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--quantization", default=None,
                    help="grace_qat; none for stock SGLang; humming for stock SGLang's --quantization humming")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--eager", action="store_true", help="disable CUDA graphs")
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--image-batches", default="", help="(accepted for the harness; not timed here)")
    ap.add_argument("--tokenizer-path", default=None,
                    help="tokenizer/processor directory (original-layout LLaVA: `grace-qat llava-processor`)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quantization in STOCK:             # stock SGLang: the plugin stays out
        os.environ["SGLANG_PLUGINS"] = DISABLED_PLUGINS     # inherited by SGLang's scheduler processes
    elif args.quantization == "grace_qat":
        expose_entry_point()
    import sglang
    import torch

    kwargs = engine_kwargs(args)
    t0 = time.perf_counter()
    engine = sglang.Engine(**kwargs)
    load_s = time.perf_counter() - t0
    try:
        tokenizer = engine.tokenizer_manager.tokenizer
        vocab = min(getattr(tokenizer, "vocab_size", 30000) or 30000, 30000)
        sp = {"temperature": 0.0, "max_new_tokens": args.gen_tokens, "ignore_eos": True}
        if args.no_image:
            out = engine.generate(input_ids=list(range(5, 69)), sampling_params=sp)
        else:   # the model's own chat format (LLaVA-1.5: vicuna_v1), as the GPU check builds it
            from sglang_serve_check import build_prompts
            prompt, _ = build_prompts(args.model, None, "Describe the image in one sentence.")
            out = engine.generate(prompt=prompt, image_data=_image_data_url(), sampling_params=sp)
        scored = engine.generate(input_ids=scoring_ids(vocab), sampling_params={"max_new_tokens": 1},
                                 return_logprob=True, logprob_start_len=0)
        prompt_logprobs = _input_logprobs(scored)
        small_m_logprobs = []   # one request at a time (see vllm_run.short_prompts)
        for ids in short_prompts(scoring_ids(vocab)):
            small_m_logprobs += _input_logprobs(engine.generate(
                input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True, logprob_start_len=0))
        runs = [_decode_tps(engine, int(b), args.prompt_len, args.out_len, vocab)
                for b in args.batches.split(",") if b]
        weights_gib = None
        try:
            weights_gib = engine.get_server_info().get("weight_memory_gib")   # not in every version
        except Exception:
            pass
        emit_result({"name": args.name or os.path.basename(args.model.rstrip("/")), "model": args.model,
                     "engine": f"sglang {sglang.__version__}", "torch": torch.__version__,
                     "prefix_caching": False, "engine_kwargs": kwargs,
                     "quantization": args.quantization, "tp": args.tp,
                     "load_s": load_s, "tokens": out.get("output_ids"), "text": out.get("text"),
                     "logprobs": [], "prompt_logprobs": prompt_logprobs, "small_m_logprobs": small_m_logprobs,
                     "runs": runs, "image_runs": [],
                     "weights_gib_measured": weights_gib,
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}, args.out)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
