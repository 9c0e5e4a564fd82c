#!/usr/bin/env python3
"""Serve a GRACE checkpoint on SGLang with the grace_qat plugin and compare with stock SGLang.

    python3 tests/gpu/sglang_serve_check.py --model DIR --out FILE [options]

Needs a CUDA GPU (compute capability >= 8.0), SGLang (0.5.17 or 0.5.23 tested on CPU for
everything up to the kernels) and this repository installed or on PYTHONPATH. Three steps, each in
its own child process so that GPU memory and SGLang's process-wide state start clean:

1. ``layer``: SGLang's QKV / merged / row-parallel layers of decoder layer 0, built with the
   plugin's quantization config on the GPU, loaded from the checkpoint, repacked by SGLang's Marlin
   code (JIT-compiled with nvcc on first use) and run on random activations; each output is compared
   with ``x @ (codes * steps)^T`` computed in fp32 from the checkpoint (GPTQ semantics: steps in
   the activation dtype) and with the checkpoint's own fake-quantized weight. Proves the Marlin
   hand-off (packing, scale permutation, shard order) numerically, independent of serving.
2. ``engine`` (plugin): ``sglang.Engine(model_path=DIR, quantization="grace_qat",
   attention_backend="triton")``; one image+text request and one text-only request, greedy
   (temperature 0, ``ignore_eos`` so both runs produce the same number of tokens).
3. ``engine`` (stock): the same on a GPTQ copy written by ``grace_qat.convert.convert(DIR, COPY,
   to="gptq")`` (or ``--reference DIR``), with the plugin disabled (``SGLANG_PLUGINS`` set to a name
   no plugin has), so SGLang serves it with its own GPTQ-Marlin path.

The JSON written to ``--out`` holds every step's result, the greedy token ids of both runs and
whether they are identical. The exit status is 0 only when every step that ran passed AND (unless
``--skip-reference``) both requests gave the stock run's greedy tokens exactly; otherwise 1, with
one line on stderr naming every failure (``check_failures``).

Vision attention: ``mm_attention_backend="triton_attn"`` is passed to both engines wherever this
SGLang has that server argument (``sglang_vision_attention``). SGLang's Qwen3-VL vision tower
defaults to FA3 on Hopper, which bundles without FA3 cannot run (every image request failed, plugin
and stock alike). It is passed always, not only where FA3 is missing: the vision tower is
unquantized and untouched by the plugin, and one portable backend on both sides keeps the
comparison, and results from a bundle and from a published image, alike.
``GRACE_SGLANG_MM_ATTENTION=default`` leaves SGLang's own choice.

Options worth knowing: ``--tp N``; ``--image PATH`` (default: a synthetic picture);
``--skip-layer-check`` / ``--skip-reference``; ``--tokenizer-path`` (for original-layout LLaVA,
whose own tokenizer has no ``<image>`` token: the directory ``grace-qat llava-processor`` writes);
``--chat-template``; ``--disable-cuda-graph``.

Note on exactness: Marlin multiplies codes by steps stored in the activation dtype (bf16 for
Qwen3-VL, fp16 for LLaVA, which SGLang always runs in fp16), so neither path reproduces the fp32
``q * exp(log_scale)`` of training bit for bit; the plugin and a GPTQ export whose scales are in the
activation dtype hand Marlin identical tensors. ``grace_qat.convert`` stores GPTQ scales in the
checkpoint's dtype (bf16 for GRACE LLaVA), so for LLaVA the stock run sees steps rounded twice
(fp32 -> bf16 -> fp16) while the plugin rounds once (fp32 -> fp16): small output differences there
are expected and are reported, not hidden.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DISABLED_PLUGINS = "__grace_qat_disabled__"   # SGLANG_PLUGINS whitelist that matches no plugin
# stock SGLang serves an original-layout LLaVA export with this template: the plugin's grace_llava_v1
# conversation as stock SGLang can load it (tests/test_sglang_plugin.py: the same token ids)
STOCK_LLAVA_TEMPLATE = os.path.join(HERE, "sglang_llava_v1.jinja")
from grace_qat.llava_hf import LLAVA_V1_SYSTEM as LLAVA_SYSTEM  # noqa: E402  (LLaVA's llava_v1 prompt)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GRACE checkpoint directory (any format)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--reference", help="GPTQ copy to serve with stock SGLang (default: convert into "
                                       "a temporary directory)")
    p.add_argument("--keep-reference", help="write the converted GPTQ copy here and keep it")
    p.add_argument("--skip-reference", action="store_true",
                   help="do not run stock SGLang (a debugging aid: the check then fails, having compared nothing)")
    p.add_argument("--skip-layer-check", action="store_true")
    p.add_argument("--image", help="image file (default: a synthetic 448x448 picture)")
    p.add_argument("--question", default="Describe this picture in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stop-at-eos", action="store_true", help="do not pass ignore_eos")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--attention-backend", default="triton")
    p.add_argument("--mem-fraction-static", type=float, default=0.6)
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--tokenizer-path", help="tokenizer/processor directory (LLaVA original layout)")
    p.add_argument("--chat-template", help="SGLang chat template name (e.g. vicuna_v1.1 for LLaVA)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per step")
    p.add_argument("--child", choices=["engine", "layer"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-quantization", help=argparse.SUPPRESS)
    p.add_argument("--child-image", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- helpers shared by the children -----------------------------------------------------------

def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def architecture(path):
    return (read_config(path).get("architectures") or ["?"])[0]


def text_dims(path):
    cfg = read_config(path)
    tc = cfg.get("text_config") or cfg
    h, nh = tc["hidden_size"], tc["num_attention_heads"]
    return dict(hidden=h, inter=tc["intermediate_size"], heads=nh,
                kv_heads=tc.get("num_key_value_heads", nh), head_dim=tc.get("head_dim") or h // nh)


def synthetic_image(path):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (448, 448))
    px = img.load()
    for y in range(448):
        for x in range(448):
            px[x, y] = (x * 255 // 447, y * 255 // 447, (x + y) * 255 // 894)
    d = ImageDraw.Draw(img)
    d.ellipse((60, 60, 220, 220), fill=(230, 40, 40))
    d.rectangle((250, 230, 400, 400), fill=(30, 60, 220))
    d.line((0, 447, 447, 0), fill=(255, 255, 255), width=6)
    img.save(path)
    return path


def build_prompts(model_dir, tokenizer_dir, question):
    """(image+text prompt, text-only prompt) in the model's own chat format."""
    arch = architecture(model_dir)
    if arch == "LlavaLlamaForCausalLM":        # llava_v1, as the grace_llava_v1 template renders it:
        # "<image> " so that one tokenization gives LLaVA's ids (grace_sglang/llava.py)
        return (f"{LLAVA_SYSTEM} USER: <image> \n{question} ASSISTANT:",
                f"{LLAVA_SYSTEM} USER: {question} ASSISTANT:")
    src = tokenizer_dir or model_dir
    mm = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    txt = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    try:
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(src)
        return (proc.apply_chat_template(mm, add_generation_prompt=True, tokenize=False),
                proc.apply_chat_template(txt, add_generation_prompt=True, tokenize=False))
    except Exception:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src)
        return (tok.apply_chat_template(mm, add_generation_prompt=True, tokenize=False),
                tok.apply_chat_template(txt, add_generation_prompt=True, tokenize=False))


@contextlib.contextmanager
def tp_partition(rank: int, size: int, device: str = "cuda"):
    """Build SGLang layers as TP rank ``rank`` of ``size`` on ``device``, without other processes;
    yields the layers' extra keyword arguments.

    SGLang 0.5.17's layers take ``tp_rank``/``tp_size``; 0.5.23's read the partition from the
    runtime context a launched worker publishes, published here as SGLang's own test helper
    (``sglang.test.test_utils.published_topology``) does: the GPU machine's engine bundle leaves the
    engines' test packages out (and that module imports SGLang's benchmark and eval code).
    """
    from sglang.srt.layers.linear import ColumnParallelLinear
    if "tp_rank" in inspect.signature(ColumnParallelLinear.__init__).parameters:
        yield {"tp_rank": rank, "tp_size": size}
        return
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs
    reset_context()
    publish(ServerArgs(model_path="dummy", tp_size=size, device=device), role="test",
            ranks=SpawnRanks(world_rank=rank, dp_rank=None))
    try:
        yield {}
    finally:
        reset_context()


def stock_llava_overrides(model_dir) -> dict:
    """Engine kwargs stock SGLang needs for an original-layout LLaVA-1.5 (none for other models): it keeps
    LlavaConfig's default <image> id (32000); tell it where the processor's is (the plugin sets it
    itself), so both runs place the image alike on any vocabulary size."""
    if architecture(model_dir) != "LlavaLlamaForCausalLM":
        return {}
    return {"json_model_override_args": json.dumps({"image_token_index": read_config(model_dir)["vocab_size"]})}


def sglang_vision_attention() -> dict:
    """``{"mm_attention_backend": CHOICE}`` (default triton_attn) where this SGLang's server arguments
    offer it, else ``{}`` (feature detection through SGLang's own argument parser; see the module
    docstring for why it is always passed)."""
    choice = os.environ.get("GRACE_SGLANG_MM_ATTENTION", "triton_attn")
    if choice in ("", "default"):
        return {}
    from sglang.srt.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    action = next((a for a in parser._actions if a.dest == "mm_attention_backend"), None)
    if action is None or (action.choices and choice not in action.choices):
        return {}
    return {"mm_attention_backend": choice}


# -- child: layer-level Marlin check --------------------------------------------------------------

def child_layer(args):
    import torch
    from sglang.srt.plugins import load_plugins
    load_plugins()
    import grace_sglang
    grace_sglang.register()
    from sglang.srt.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                          RowParallelLinear)
    from grace_qat.checkpoint import GraceCheckpoint
    from grace_sglang.config import GraceQATConfig

    model = args.model
    ckpt = GraceCheckpoint.open(model)
    qc = GraceQATConfig(model)
    d = text_dims(model)
    first = ckpt.modules[0]
    base = first[: first.index("layers.")]              # "model.language_model." or "model."
    p = f"{base}layers.0."
    act = torch.float16 if architecture(model) == "LlavaLlamaForCausalLM" else torch.bfloat16
    dev = torch.device("cuda")
    specs = {
        "qkv_proj": (lambda kw: QKVParallelLinear(d["hidden"], d["head_dim"], d["heads"], d["kv_heads"],
                                                  bias=False, quant_config=qc, params_dtype=act,
                                                  prefix=p + "self_attn.qkv_proj", **kw),
                     [("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")]),
        "o_proj": (lambda kw: RowParallelLinear(d["heads"] * d["head_dim"], d["hidden"], bias=False,
                                                quant_config=qc, params_dtype=act,
                                                prefix=p + "self_attn.o_proj", **kw),
                   [("self_attn.o_proj", None)]),
        "gate_up_proj": (lambda kw: MergedColumnParallelLinear(d["hidden"], [d["inter"]] * 2, bias=False,
                                                               quant_config=qc, params_dtype=act,
                                                               prefix=p + "mlp.gate_up_proj", **kw),
                         [("mlp.gate_proj", 0), ("mlp.up_proj", 1)]),
        "down_proj": (lambda kw: RowParallelLinear(d["inter"], d["hidden"], bias=False, quant_config=qc,
                                                   params_dtype=act, prefix=p + "mlp.down_proj", **kw),
                      [("mlp.down_proj", None)]),
    }
    leaves = ["qweight", "qzeros", "scales"] if ckpt.format == "awq" else ["weight"]
    torch.manual_seed(0)
    results = {"format": ckpt.format, "bits": ckpt.bits, "act_dtype": str(act), "layers": {}}
    ok = True
    for key, (make, parts) in specs.items():
        r = {}
        try:
            t0 = time.time()
            with tp_partition(0, 1) as kw, torch.device(dev):
                layer = make(kw)
            params = dict(layer.named_parameters())
            for mod, shard in parts:
                for leaf in leaves:
                    args_ = () if shard is None else (shard,)
                    params[leaf].weight_loader(params[leaf], ckpt.tensors.get(p + mod + "." + leaf), *args_)
            layer.quant_method.process_weights_after_loading(layer)
            torch.cuda.synchronize()
            r["method"] = type(layer.quant_method).__name__
            r["load_and_repack_s"] = round(time.time() - t0, 2)
            qs = [ckpt.quantized(p + m) for m, _ in parts]
            codes = torch.cat([q.codes for q in qs]).to(dev, torch.float32)
            steps = torch.cat([q.scales for q in qs]).to(dev)
            g = codes.shape[1] // steps.shape[1]
            w_marlin = (codes.view(codes.shape[0], -1, g) * steps.to(act).float().unsqueeze(-1)).view_as(codes)
            w_qat = (codes.view(codes.shape[0], -1, g) * steps.float().unsqueeze(-1)).view_as(codes).to(
                torch.bfloat16).float()
            errs = []
            for m in (1, 16, 77):
                x = (torch.randn(m, codes.shape[1], device=dev) * 0.5).to(act)
                y = layer.quant_method.apply(layer, x).float()
                xr = x.float()
                for name, w in (("gptq_semantics", w_marlin), ("qat_weight", w_qat)):
                    ref = xr @ w.t()
                    rel = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
                    errs.append({"m": m, "reference": name, "rel_err": rel,
                                 "max_abs_err": float((y - ref).abs().max())})
            r["errors"] = errs
            worst = max(e["rel_err"] for e in errs if e["reference"] == "gptq_semantics")
            r["worst_rel_err_gptq_semantics"] = worst
            r["passed"] = worst < 2e-2
        except Exception as e:  # report and go on with the next layer
            r["exception"] = f"{type(e).__name__}: {e}"
            r["traceback"] = traceback.format_exc()[-3000:]
            r["passed"] = False
        ok &= r["passed"]
        results["layers"][key] = r
        print(f"[layer] {key}: {json.dumps({k: v for k, v in r.items() if k not in ('errors', 'traceback')})}",
              flush=True)
    results["passed"] = ok
    return results


# -- child: one engine run --------------------------------------------------------------------

def child_engine(args):
    if args.child_quantization == "none":
        os.environ["SGLANG_PLUGINS"] = DISABLED_PLUGINS   # stock SGLang, in every child process too
    else:   # the plugin on Marlin alone, as stock runs the export: no kernel table's second kernel
        os.environ.setdefault("GRACE_QAT_DUAL_KERNEL", "0")
    import torch
    import sglang

    mm_prompt, text_prompt = build_prompts(args.model, args.tokenizer_path, args.question)
    kwargs = dict(model_path=args.model, attention_backend=args.attention_backend,
                  mem_fraction_static=args.mem_fraction_static, tp_size=args.tp, random_seed=0,
                  context_length=args.context_length, log_level="info", **sglang_vision_attention())
    if args.child_quantization not in (None, "none", "auto"):
        kwargs["quantization"] = args.child_quantization
    if args.disable_cuda_graph:
        kwargs["disable_cuda_graph"] = True
    if args.tokenizer_path:
        kwargs["tokenizer_path"] = args.tokenizer_path
    if args.chat_template:
        kwargs["chat_template"] = args.chat_template
    if args.child_quantization == "none":
        kwargs.update(stock_llava_overrides(args.model))
    res = {"engine_kwargs": kwargs, "sglang": sglang.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "prompts": {"image_text": mm_prompt, "text": text_prompt}}
    t0 = time.time()
    engine = sglang.Engine(**kwargs)
    res["engine_start_s"] = round(time.time() - t0, 1)
    try:
        try:
            info = engine.get_server_info()
            res["server_quantization"] = info.get("quantization")
            res["server_dtype"] = str(info.get("dtype"))
        except Exception as e:
            res["server_info_error"] = repr(e)
        sp = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}
        if not args.stop_at_eos:
            sp["ignore_eos"] = True
        res["requests"] = {}
        for name, prompt, image in (("image_text", mm_prompt, args.child_image), ("text", text_prompt, None)):
            t1 = time.time()
            kw = {"prompt": prompt, "sampling_params": sp}
            if image:
                kw["image_data"] = image
            out = engine.generate(**kw)
            meta = out.get("meta_info", {})
            res["requests"][name] = {
                "seconds": round(time.time() - t1, 2), "text": out.get("text"),
                "output_ids": out.get("output_ids"),
                "prompt_tokens": meta.get("prompt_tokens"), "completion_tokens": meta.get("completion_tokens")}
            print(f"[engine] {name}: {res['requests'][name]['output_ids']} {out.get('text')!r}", flush=True)
    finally:
        engine.shutdown()
    return res


# -- parent ---------------------------------------------------------------------------------------

def ensure_entry_point(work):
    """SGLang's scheduler processes register plugins only through the ``sglang.srt.plugins`` entry
    point. When this repository is merely on PYTHONPATH (not pip-installed), expose the entry point
    through a minimal ``.dist-info`` directory in ``work``; returns the directory to add to
    PYTHONPATH, or None when an installed distribution already declares it."""
    from importlib.metadata import entry_points
    if any(ep.name == "grace_qat" for ep in entry_points(group="sglang.srt.plugins")):
        return None
    d = os.path.join(work, "eps")
    info = os.path.join(d, "grace_qat_sglang_entry_point-0.0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: grace-qat-sglang-entry-point\nVersion: 0.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[sglang.srt.plugins]\ngrace_qat = grace_sglang:register\n")
    return d


def run_child(args, kind, extra, log_path):
    out = tempfile.mktemp(suffix=".json", prefix=f"sglang_check_{kind}_")
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--out", args.out,
           "--child", kind, "--child-out", out, "--question", args.question,
           "--max-new-tokens", str(args.max_new_tokens), "--tp", str(args.tp),
           "--attention-backend", args.attention_backend,
           "--mem-fraction-static", str(args.mem_fraction_static),
           "--context-length", str(args.context_length)] + extra
    for flag, val in (("--tokenizer-path", args.tokenizer_path), ("--chat-template", args.chat_template)):
        if val:
            cmd += [flag, val]
    if args.disable_cuda_graph:
        cmd.append("--disable-cuda-graph")
    if args.stop_at_eos:
        cmd.append("--stop-at-eos")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in [ROOT, getattr(args, "entry_point_dir", None), os.environ.get("PYTHONPATH")] if x))
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = {"returncode": rc, "seconds": round(time.time() - t0, 1), "log": log_path}
    if os.path.exists(out):
        with open(out) as f:
            res.update(json.load(f))
        os.unlink(out)
    else:
        with open(log_path) as f:
            res["log_tail"] = f.read()[-6000:]
    return res


def compare(a, b):
    out = {}
    for name in ("image_text", "text"):
        x = (((a or {}).get("requests") or {}).get(name) or {}).get("output_ids")
        y = (((b or {}).get("requests") or {}).get(name) or {}).get("output_ids")
        if x is None or y is None:
            out[name] = {"identical": None}
            continue
        first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if first is None and len(x) != len(y):
            first = min(len(x), len(y))
        out[name] = {"identical": first is None, "first_difference": first, "plugin_len": len(x),
                     "stock_len": len(y)}
    return out


def check_failures(result: dict) -> list[str]:
    """Every reason this check fails, one short phrase each: a failed layer check, an engine run that
    failed, or (when stock SGLang ran) any request whose greedy tokens are not exactly stock's."""
    bad = []
    layer = result.get("layer_check")
    if layer is not None and not layer.get("passed"):
        worst = [k for k, v in (layer.get("layers") or {}).items() if not v.get("passed")]
        bad.append(f"layer check failed ({', '.join(worst) or layer.get('exception') or 'no result'})")
    for side in ("plugin", "stock"):
        r = result.get(side)
        if r is not None and (r.get("returncode") != 0 or "exception" in r):
            why = r.get("exception") or f"return code {r.get('returncode')}"
            bad.append(f"{side} engine failed: {str(why).splitlines()[0][:200]} (log {r.get('log')})")
    if result.get("stock") is None:
        bad.append("stock SGLang did not run (--skip-reference): the plugin's tokens were compared with nothing")
    else:
        for name, c in (result.get("comparison") or {}).items():
            if c.get("identical") is None:
                bad.append(f"{name}: no tokens to compare")
            elif not c["identical"]:
                bad.append(f"{name}: plugin tokens differ from stock from position {c['first_difference']} "
                           f"({c['plugin_len']} vs {c['stock_len']} tokens)")
        if not result.get("comparison"):
            bad.append("no comparison with stock SGLang")
    return bad


def main(argv=None):
    args = parse_args(argv)
    args.model = os.path.abspath(args.model)
    if args.child:
        fn = child_layer if args.child == "layer" else child_engine
        try:
            res = fn(args)
        except Exception as e:
            res = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:]}
            traceback.print_exc()
        with open(args.child_out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        return 0 if "exception" not in res else 1

    from grace_qat.checkpoint import GraceCheckpoint
    result = {"model": args.model, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "host": platform.node(), "python": sys.version.split()[0], "argv": sys.argv[1:]}
    ckpt = GraceCheckpoint.open(args.model)
    result["checkpoint"] = ckpt.describe()
    result["architecture"] = architecture(args.model)
    work = tempfile.mkdtemp(prefix="sglang_check_")
    logs = os.path.splitext(os.path.abspath(args.out))[0] + "_logs"
    os.makedirs(logs, exist_ok=True)
    image = args.image or synthetic_image(os.path.join(work, "image.png"))
    args.entry_point_dir = ensure_entry_point(work)
    result["entry_point"] = "installed" if args.entry_point_dir is None else "shim on PYTHONPATH"
    passed = True

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    if not args.skip_layer_check:
        r = run_child(args, "layer", [], os.path.join(logs, "layer.log"))
        result["layer_check"] = r
        passed &= bool(r.get("passed"))
        save()

    r = run_child(args, "engine", ["--child-quantization", "grace_qat", "--child-image", image],
                  os.path.join(logs, "engine_plugin.log"))
    result["plugin"] = r
    passed &= r.get("returncode") == 0 and "exception" not in r
    save()

    if not args.skip_reference:
        ref = args.reference
        if ref is None:
            from grace_qat.convert import convert
            ref = args.keep_reference or os.path.join(work, "gptq")
            t0 = time.time()
            convert(args.model, ref, to="gptq")
            result["reference_conversion_s"] = round(time.time() - t0, 1)
        result["reference_dir"] = os.path.abspath(ref)
        ref_args = argparse.Namespace(**vars(args))
        ref_args.model = os.path.abspath(ref)
        r = run_child(ref_args, "engine", ["--child-quantization", "none", "--child-image", image],
                      os.path.join(logs, "engine_stock.log"))
        result["stock"] = r
        passed &= r.get("returncode") == 0 and "exception" not in r
        result["comparison"] = compare(result["plugin"], r)
        save()

    failures = check_failures(result)
    result["failures"] = failures
    result["passed"] = bool(passed) and not failures
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    shutil.rmtree(work, ignore_errors=True)     # the image and, unless kept, the GPTQ copy
    print(json.dumps({"passed": result["passed"], "comparison": result.get("comparison"),
                      "layer_check": (result.get("layer_check") or {}).get("passed")}, indent=1))
    if not result["passed"]:
        print(f"sglang_serve_check: FAILED {args.model}: {'; '.join(failures) or 'a step failed'}",
              file=sys.stderr, flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
