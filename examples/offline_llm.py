"""Offline generation with vLLM and grace_qat (no server).

    python examples/offline_llm.py /models/Qwen3-VL-2B-GRACE-W4G128 cat.jpg "Describe the image."
"""
import sys

from PIL import Image
from vllm import LLM, SamplingParams


def main(model: str, image: str, question: str) -> None:
    llm = LLM(model, quantization="grace_qat", max_model_len=4096)
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": Image.open(image).convert("RGB")},
        {"type": "text", "text": question}]}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=128))
    print(out[0].outputs[0].text)


if __name__ == "__main__":   # vLLM may spawn worker processes: keep the guard
    main(*sys.argv[1:4])
