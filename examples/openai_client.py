"""Ask a served GRACE model about an image over the OpenAI-compatible API.

    python examples/openai_client.py --base-url http://localhost:8000/v1 --image cat.jpg "What is this?"
"""
import argparse
import base64
import mimetypes

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("question")
    ap.add_argument("--image", required=True)
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = client.models.list().data[0].id
    mime = mimetypes.guess_type(args.image)[0] or "image/png"
    with open(args.image, "rb") as f:
        url = f"data:{mime};base64," + base64.b64encode(f.read()).decode()
    reply = client.chat.completions.create(model=model, max_tokens=args.max_tokens, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": args.question}]}])
    print(reply.choices[0].message.content)


if __name__ == "__main__":
    main()
