"""What users have today: plain Transformers ``generate`` on the BF16-on-grid checkpoint (the model
card's path). Same command line and RESULT line as vllm_run.py, so vllm_bench.py can drive it.

    python benchmarks/hf_run.py --model DIR --batches 1,8 --out res.jsonl
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from vllm_run import chat_messages, emit_result, prompt_ids, steady_decode   # this script's folder


def _decode_tps(model, batch: int, prompt_len: int, out_len: int, vocab: int, device: str) -> dict:
    """Decode tokens/s as vllm_run defines it (steady_decode), on the same token-id prompts."""
    ids = torch.tensor(prompt_ids(batch, prompt_len, vocab), device=device)

    def timed(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return steady_decode(timed, batch, out_len, warmup_tokens=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", default="hf-generate")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quantization", default=None, help="ignored (interface of vllm_run.py)")
    ap.add_argument("--tp", type=int, default=1, help="ignored")
    ap.add_argument("--eager", action="store_true", help="ignored")
    ap.add_argument("--no-image", action="store_true")
    args = ap.parse_args()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights_gib = (torch.cuda.memory_allocated() / 2 ** 30) if device == "cuda" else None

    messages = chat_messages()
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, new.tolist())]
    with torch.no_grad():
        runs = [_decode_tps(model, int(b), args.prompt_len, args.out_len, model.config.get_text_config().vocab_size,
                            device) for b in args.batches.split(",") if b]
    import transformers
    result = {"name": args.name, "model": args.model, "engine": f"transformers {transformers.__version__}",
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
              "quantization": None, "tp": 1, "load_s": load_s,
              "weights_gib_measured": weights_gib, "tokens": new.tolist(),
              "text": processor.decode(new, skip_special_tokens=True), "logprobs": logprobs, "runs": runs}
    emit_result(result, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
