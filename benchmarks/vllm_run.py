"""Run ONE vLLM system on one checkpoint and print one JSON line: load time, weight memory, kernel,
greedy tokens of an image+text prompt, and decode throughput per batch size.

Each system runs in its own process (``benchmarks/vllm_bench.py`` drives several), so GPU memory
and vLLM's global state never leak from one system into the next.

    python benchmarks/vllm_run.py --model DIR [--quantization grace_qat] --batches 1,8,32 --out res.jsonl
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time


def _image_data_url(seed: int = 0) -> str:
    import base64

    from PIL import Image

    img = Image.new("RGB", (224, 168))
    px = img.load()
    for x in range(224):
        for y in range(168):
            px[x, y] = ((x * 7 + seed) % 256, (y * 5) % 256, ((x + y) * 3) % 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(question: str = "Describe the image in one sentence."):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image_data_url()}},
        {"type": "text", "text": question}]}]


def prompt_ids(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """The fixed token-id prompts every runner times (one per request of the batch)."""
    return [[(17 * i + 31 * j) % (vocab - 10) + 5 for j in range(prompt_len)] for i in range(batch)]


def steady_decode(timed, batch: int, out_len: int, warmup_tokens: int = 4, repeats: int = 5) -> dict:
    """Decode tokens/s, the one definition every runner uses: (time for out_len tokens - time for 1
    token) over the extra tokens, the median of ``repeats`` measurements (each its own 1-token and
    out_len-token run) after a warm-up at this batch size; every repeat is kept in ``repeats``.
    ``timed(n)`` generates n tokens for the whole batch and returns the seconds it took."""
    timed(warmup_tokens)
    runs = []
    for _ in range(repeats):
        t1, tn = timed(1), timed(out_len)
        runs.append({"ttft_s": t1, "total_s": tn, "decode_tok_s": batch * (out_len - 1) / max(tn - t1, 1e-9)})
    median = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
    return dict(median, batch=batch, repeats=[round(r["decode_tok_s"], 2) for r in runs])


def scoring_ids(vocab: int, length: int = 96) -> list[int]:
    """The fixed token sequence every system scores (teacher-forced prompt log-probs)."""
    return [(13 * j * j + 7 * j) % (vocab - 10) + 5 for j in range(length)]


SHORT_PROMPT_LENGTHS = (8, 5, 2, 7, 4, 3, 6)


def short_prompts(ids: list[int]) -> list[list[int]]:
    """``ids`` cut into prompts of 2-8 tokens, each scored as a request of its own: a prefill of that
    few tokens runs the layers' small-batch kernels (a second kernel routes M <= 8 or more), which the
    96-token scored sequence never reaches."""
    out, i = [], 0
    while i + 2 <= len(ids):
        n = SHORT_PROMPT_LENGTHS[len(out) % len(SHORT_PROMPT_LENGTHS)]
        out.append(ids[i:i + n])
        i += n
    return out


def prompt_logprobs_of(output) -> list[float | None]:
    """The teacher-forced log-prob of each prompt token of a vLLM ``RequestOutput`` (None first)."""
    return [None if lp is None else float(lp[tok].logprob)
            for tok, lp in zip(output.prompt_token_ids, output.prompt_logprobs)]


def emit_result(result: dict, out: str | None) -> None:
    """The one machine-readable line vllm_bench.py parses (and, optionally, a JSONL record)."""
    line = json.dumps(result)
    print("RESULT " + line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def _decode_tps(llm, batch: int, prompt_len: int, out_len: int, vocab: int, image: bool = False) -> dict:
    """Decode tokens/s (steady_decode) on fixed token-id prompts, or (image=True) image+text chats."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(batch, prompt_len, vocab)]
    chats = [chat_messages(f"Describe the image. Request {i}.") for i in range(batch)]

    def timed(n):
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        if image:
            llm.chat(chats, sp, use_tqdm=False)
        else:
            llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    return dict(steady_decode(timed, batch, out_len), prompt="image+text" if image else "text")


def decode_profile(llm, prompt_len: int, steps: int, vocab: int, top: int = 25) -> dict:
    """GPU kernels of ``steps`` decode steps at batch 1 (a 1-token run subtracted, as in
    steady_decode): per kernel name, launches and microseconds per step; where the time of a step
    goes when two systems run the same weights at different speeds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(1, prompt_len, vocab)]
    cuda = torch.cuda.is_available()      # a CPU engine: its operators instead of kernels

    def kernels(n: int) -> dict:          # the engine is warm: the timed runs came first
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            llm.generate(prompts, sp, use_tqdm=False)
        out = {}
        for e in prof.key_averages():
            us = (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) if cuda \
                else e.self_cpu_time_total
            if us:
                out[e.key] = (e.count, us)
        return out

    one, many = kernels(1), kernels(steps + 1)
    per_step = {}
    for name, (count, us) in many.items():
        c0, u0 = one.get(name, (0, 0.0))
        per_step[name] = {"launches": (count - c0) / steps, "us": (us - u0) / steps}
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1]["us"])
    return {"steps": steps, "us_per_step": sum(v["us"] for v in per_step.values()),
            "launches_per_step": sum(v["launches"] for v in per_step.values()),
            "kernels": dict(ranked[:top])}


def model_tensors(model) -> dict:
    """Every parameter and buffer of a loaded model: [dtype, shape, strides, data pointer mod 16
    (Inductor specializes on 16-byte aligned inputs), device]. Two systems on the same weights whose
    compiled graphs run the same computation at different speeds (lease 3: one Inductor reduction
    73.7 vs 38.7 us per step) differ in their graphs or in one of these; module level, so that vLLM's
    ``apply_model`` can send it to a worker."""
    out = {}
    for named in (model.named_parameters(), model.named_buffers()):
        for name, t in named:
            out[name] = [str(t.dtype).replace("torch.", ""), list(t.shape), list(t.stride()),
                         t.data_ptr() % 16, str(t.device)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gen-tokens", type=int, default=24, help="greedy tokens for the equality check")
    ap.add_argument("--max-num-seqs", type=int, default=128,
                    help="also sizes vLLM's pinned per-request buffers (max_num_seqs x vocab)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--image-batches", default="", help="batch sizes to also time with image+text prompts")
    ap.add_argument("--out", default=None, help="append the JSON line here too")
    ap.add_argument("--profile-tokens", type=int, default=0,
                    help="also profile this many decode steps at batch 1 (engine in this process): GPU "
                         "kernels per step, by name, in the result's 'profile'")
    ap.add_argument("--linear-backend", default=None,
                    help="vLLM's --linear-backend (machete, humming, marlin, ...): the one-flag kernel choice")
    args = ap.parse_args()

    # A forked engine core inherits the parent's OpenMP pool and hung in its first big CPU tensor
    # op on the GPU machine (seen with vLLM 0.26: stuck in InputBatch.__init__); spawn a fresh one.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if args.profile_tokens:     # the engine core in this process, where the profiler sees its kernels
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    # no prefix caching: the timed runs repeat the same prompts, which would otherwise be cached
    # (a cached prefill makes TTFT meaningless and shifts the 1-token baseline of steady_decode)
    extra = {"linear_backend": args.linear_backend} if args.linear_backend else {}
    llm = LLM(args.model, quantization=args.quantization, dtype=args.dtype, tensor_parallel_size=args.tp,
              max_model_len=args.max_model_len, enforce_eager=args.eager, max_num_seqs=args.max_num_seqs, gpu_memory_utilization=0.85,
              limit_mm_per_prompt={"image": 0 if args.no_image else 1}, seed=0, enable_prefix_caching=False, **extra)
    load_s = time.perf_counter() - t0

    sp = SamplingParams(temperature=0.0, max_tokens=args.gen_tokens, ignore_eos=True, logprobs=1)
    if args.no_image:
        outs = llm.generate([{"prompt_token_ids": list(range(5, 69))}], sp, use_tqdm=False)
    else:
        outs = llm.chat([chat_messages()], sp, use_tqdm=False)
    out = outs[0].outputs[0]
    tokens = list(out.token_ids)
    logprobs = [float(next(iter(lp.values())).logprob) if lp else None for lp in (out.logprobs or [])]

    vocab = llm.get_tokenizer().vocab_size if not args.no_image else 1000
    vocab = min(vocab, 30000)
    # teacher-forced log-probs of one fixed token sequence: compares systems position by position,
    # also where their greedy outputs part (random weights give near-uniform, easily flipped argmaxes)
    scored = llm.generate([{"prompt_token_ids": scoring_ids(vocab)}],
                          SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    prompt_logprobs = prompt_logprobs_of(scored)
    small_m_logprobs = []       # one request at a time: batched, the prefills would add up past M = 8
    for ids in short_prompts(scoring_ids(vocab)):
        small_m_logprobs += prompt_logprobs_of(llm.generate(
            [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0])
    runs = [_decode_tps(llm, int(b), args.prompt_len, args.out_len, vocab)
            for b in args.batches.split(",") if b]
    image_runs = [_decode_tps(llm, int(b), args.prompt_len, args.out_len, vocab, image=True)
                  for b in args.image_batches.split(",") if b and not args.no_image]
    result = {"name": args.name or os.path.basename(args.model.rstrip("/")), "model": args.model,
              "engine": f"vllm {vllm.__version__}", "torch": torch.__version__, "prefix_caching": False,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "quantization": args.quantization, "linear_backend": args.linear_backend, "tp": args.tp,
              "load_s": load_s, "tokens": tokens,
              "text": out.text, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
              "small_m_logprobs": small_m_logprobs, "runs": runs,
              "image_runs": image_runs}
    if args.profile_tokens:
        result["profile"] = decode_profile(llm, args.prompt_len, args.profile_tokens, vocab)
        try:
            result["tensors"] = llm.apply_model(model_tensors)[0]
        except Exception as e:      # an engine without apply_model: the profile stands alone
            result["tensors_error"] = f"{type(e).__name__}: {e}"[:300]
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
