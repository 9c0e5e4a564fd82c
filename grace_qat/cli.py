"""``grace-qat``: inspect, verify, convert and generate GRACE checkpoints.

Bad input exits with status 2 and one line saying what is wrong (file, tensor, expectation).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import GraceFormatError


def _description(fmt: str) -> str:
    from . import formats
    return formats.get(fmt).description


def _histogram(codes_iter, bits: int) -> dict:
    """Code histogram, parameter count and packed size over every module's codes."""
    import torch

    from .quantizer import code_range
    qmin, _ = code_range(bits)
    hist = torch.zeros(1 << bits, dtype=torch.int64)
    params = packed_bytes = 0
    for codes, scales in codes_iter:
        hist += torch.bincount((codes.to(torch.int64) - qmin).flatten(), minlength=hist.numel())
        params += codes.numel()
        packed_bytes += codes.numel() * bits // 8 + scales.numel() * 2
    return {"quantized_params": params, "bytes_bf16": params * 2, "bytes_packed": packed_bytes,
            "code_histogram": {str(qmin + i): int(c) for i, c in enumerate(hist.tolist())}, "verified": True}


def _print_codes(report: dict) -> None:
    print(f"  parameters  {report['quantized_params']:,} quantized")
    print(f"  bytes       {report['bytes_bf16'] / 1e6:,.1f} MB as bf16 -> "
          f"{report['bytes_packed'] / 1e6:,.1f} MB packed "
          f"({report['bytes_packed'] / report['bytes_bf16']:.3f}x)")
    peak = max(report["code_histogram"].values())
    print("  codes")
    for code, count in report["code_histogram"].items():
        print(f"    {int(code):5d} {count:14,d} {'#' * int(40 * count / peak)}")


def _model_dir(model: str) -> str:
    """A directory, or a Hub id's snapshot in the local Hugging Face cache (as the engines resolve it)."""
    from .hub import is_hub_id, local_checkpoint_dir
    return local_checkpoint_dir(model) if is_hub_id(model) else os.path.abspath(model)


def _inspect(args) -> int:
    from .checkpoint import GraceCheckpoint
    from . import formats, standard, targets
    from .files import check_model_dir

    path = _model_dir(args.checkpoint)
    if targets.declared(check_model_dir(path)):
        return _inspect_standard(args, path)
    ckpt = GraceCheckpoint.open(path, bits=args.bits)
    ckpt.check_served()          # the engines' first-process checks, in the same words
    report = ckpt.describe()
    if not formats.get(ckpt.format).quantizes:
        report.update(standard.describe_plain(path))
        report["serve"] = standard.serve_commands(path)
    serve = [("(stock engine, no plugin needed)", report.get("serve", []))]
    if ckpt.modules:
        report.update(_histogram(((q.codes, q.scales) for q in
                                  ckpt.iter_quantized(progress=not args.json and sys.stderr.isatty())), ckpt.bits))
        serve = _grace_serve(ckpt, path)
        report["serve"] = [c for _, cmds in serve for c in cmds]
        report["description"] = _description(ckpt.format)
    if _report_done(report, args, path):
        return 0
    if not formats.get(ckpt.format).quantizes:
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(report["dtypes"].items()))
        print(f"{report['path']}\n  format      plain: an unquantized checkpoint, no GRACE or standard "
              f"quantization ({report['tensors']} tensors: {dtypes})")
    else:
        print(f"{report['path']}\n  format      {report['format']}: {_description(ckpt.format)}\n"
              f"  bits        {report['bits']}"
              f"{' (inferred from the codes)' if ckpt.bits_inferred else ''}\n"
              f"  group size  {report['group_size']}\n  modules     {report['modules']}")
    if ckpt.modules:
        _print_codes(report)
        print("  verified    all codes on the grid and in range")
    for i, (note, cmds) in enumerate(serve):
        _print_serve(cmds, note, first=i == 0)
    if args.against:
        print(f"  against     {report['against']['source']}: {report['against']['result']}")
    return 0


def _grace_serve(ckpt, path: str) -> list[tuple[str, list[str]]]:
    """(note, commands) that serve a GRACE checkpoint, best first. The flag only where detection
    cannot tell the format (a bare grid: no declared quant_method, no marker); such a grid (what
    ``convert --to bf16`` writes) is served by a stock engine as BF16, as it is."""
    from . import formats
    from .files import QUANT_METHOD
    from .settings import AUTODETECT
    declared = (ckpt.config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD
    needs_flag = not declared and formats.marked(path, ckpt.config, ckpt.tensors.keys) is None
    flag = " --quantization grace_qat" if needs_flag else ""
    plugin = [f"vllm serve {path}{flag}", f"python -m sglang.launch_server --model-path {path}{flag}"]
    if not needs_flag:
        note = "(with the grace_qat plugin installed; detected without a flag" + \
            ("" if declared else f", unless {AUTODETECT}=0") + ")"
        return [(note, plugin)]
    from . import standard
    return [("(stock engine, no plugin needed: BF16 weights as stored)", standard.serve_commands(path)),
            (f"(with the grace_qat plugin installed: packed {ckpt.bits}-bit)", plugin)]


def _report_done(report: dict, args, path: str) -> bool:
    """Adds the --against comparison; prints the report and says so when --json asked for it."""
    if args.against:
        from . import standard
        source = _model_dir(args.against)
        report["against"] = {"source": source, "result": standard.compare(path, source, bits=args.bits)}
    if args.json:
        print(json.dumps(report, indent=2))
    return bool(args.json)


def _print_serve(commands: list[str], note: str = "(stock engine, no plugin needed)", first: bool = True) -> None:
    print(f"  {'serve' if first else '':12}{note}")
    for c in commands:
        print(f"              {c}")


def _inspect_standard(args, path: str) -> int:
    from . import standard
    from .files import dtype_name

    exp = standard.StandardCheckpoint(path)
    if args.bits is not None and args.bits != exp.bits:
        raise GraceFormatError(f"{exp.cfg_path}: quantization_config says {exp.bits}-bit, --bits says {args.bits}")
    report = {"path": exp.path, "format": exp.method, "description": exp.target.description,
              "bits": exp.bits, "group_size": exp.group_size, "modules": len(exp.modules),
              "scale_dtype": dtype_name(exp.scale_dtype())}
    report.update(_histogram(((e.codes, e.scales) for e in exp.iter_quantized()), exp.bits))
    report["serve"] = standard.serve_commands(exp.path)
    if _report_done(report, args, path):
        return 0
    print(f"{report['path']}\n  format      {exp.method}: {report['description']}\n"
          f"  bits        {exp.bits} (quantization_config)\n  group size  {exp.group_size} (quantization_config)\n"
          f"  modules     {report['modules']}\n  scales      {report['scale_dtype']}")
    _print_codes(report)
    print("  verified    zero points symmetric, codes unpacked in range, scales finite and > 0")
    _print_serve(report["serve"])
    if args.against:
        print(f"  against     {report['against']['source']}: {report['against']['result']}")
    return 0


def _convert(args) -> int:
    from .convert import convert, exactness

    ckpt = convert(_model_dir(args.checkpoint), args.output, to=args.to, bits=args.bits, progress=sys.stderr.isatty(),
                   layout=args.layout, clip_dir=args.clip_dir, force=args.force, dtype=args.dtype)
    print(f"wrote {args.output} ({args.to}, {ckpt.bits}-bit, group {ckpt.group_size}, "
          f"{len(ckpt.modules)} modules: {exactness(args.to, ckpt, args.dtype)})")
    return 0


def _llava_processor(args) -> int:
    from .llava_hf import write_processor

    write_processor(args.checkpoint, args.output, clip_dir=args.clip_dir)
    print(f"wrote {args.output}: LLaVA-1.5 tokenizer with <image>, image processor, vicuna_v1 template "
          f"(SGLang: --tokenizer-path {args.output})")
    return 0


def _fixture(args) -> int:
    from . import synthetic
    from .output import write_dir

    writer = synthetic.write_llava if args.model == "llava" else synthetic.write_qwen3vl
    kwargs = dict(size=args.size, fmt=args.format, bits=args.bits, seed=args.seed)
    try:
        write_dir(args.output, lambda tmp: writer(tmp, **kwargs), force=args.force)
    except ValueError as e:      # the fixture writer's argument checks (e.g. AWQ is 4-bit only)
        raise GraceFormatError(f"fixture {args.output}: {e}") from None
    print(f"wrote {os.path.abspath(args.output)}")
    return 0


def _kernels(args) -> int:
    """The second-kernel table the plugin would use on a device and engine version."""
    from importlib.metadata import PackageNotFoundError, version

    from .kernels import table
    device, engine = args.device, args.engine
    if device is None:
        try:
            import torch
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        except ImportError:
            device = None
    version_ = args.engine_version
    if version_ is None:
        try:
            version_ = version(engine)
        except PackageNotFoundError:
            version_ = None
    if device is None or version_ is None:
        raise GraceFormatError("kernels: give --device and --engine-version (no CUDA device or no "
                               f"{engine} installed here to read them from)")
    t = table.table_for(device, engine, version_, extra=args.table)
    where = f"{device}, {engine} {version_}"
    if t is None:
        print(f"{where}: no kernel table measured: every layer keeps one packed copy and the engine's own "
              f"kernel. Tables: " + "; ".join(f"{x['device']} / {x['engine']} {x['engine_version']}"
                                              for x in table.tables(args.table)))
        return 0
    print(f"{where}: {t['measured']}")
    pick = t.get("engine_default")
    if pick:
        print(f"  where the engine picks {pick['instead_of']} by its own ranking: {pick['use']} instead "
              f"({pick.get('measured', 'measured')})")
    for key, e in sorted(t["shapes"].items()):
        configs = "/".join(str(m) for m, _ in e.get("configs", ()))
        second = (f"{e['small']} for M <= {e['max_m']}" + (f" (>= {e['gain']}x)" if e.get("gain") else "")
                  + (f", measured launch configs for M {configs}" if configs else "")
                  if e.get("small") and e.get("max_m") else "one copy")
        print(f"  {key:24s} next to {e['large']}: {second}")
    return 0


def _demo(args) -> int:
    from .demo import main as demo_main     # starts `vllm serve` in a subprocess; imports no engine
    return demo_main(args.demo_args)


DESCRIPTION = "inspect, verify, convert and generate GRACE checkpoints; serve one with the demo"


class _Lean:
    """A subparser that takes no arguments: what ``grace-qat --help`` builds, without torch."""
    def __init__(self, parser):
        self.parser = parser

    def add_argument(self, *args, **kwargs):
        pass

    def set_defaults(self, **kwargs):
        self.parser.set_defaults(**kwargs)


def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``full=False`` lists the commands only (no torch import: fast --help)."""
    from . import __version__

    p = argparse.ArgumentParser(prog="grace-qat", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"grace-qat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    if full:
        from . import formats
        from .convert import DTYPES, LAYOUTS, TARGETS
        from .quantizer import SUPPORTED_BITS
        add = sub.add_parser
    else:
        formats, DTYPES, LAYOUTS, TARGETS, SUPPORTED_BITS = None, (), (), (), ()
        add = lambda *a, **k: _Lean(sub.add_parser(*a, **k))   # noqa: E731

    s = add("inspect", help="format, bits, codes histogram, sizes; verifies every module "
                       "(GRACE formats and the standard gptq / awq / compressed-tensors exports)")
    s.add_argument("checkpoint")
    s.add_argument("--against", metavar="SRC", help="also check that this export of SRC (grace-qat convert) "
                   "has SRC's codes bit for bit and its scales (rounded to the export's dtype)")
    s.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="state the bits instead of deriving them")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_inspect)

    s = add("convert", help="write a standard checkpoint stock engines load without the plugin")
    s.add_argument("checkpoint")
    s.add_argument("output")
    s.add_argument("--to", required=True, choices=TARGETS,
                   help="grace_qat: copy and declare quant_method grace_qat in config.json")
    s.add_argument("--bits", type=int, choices=SUPPORTED_BITS)
    s.add_argument("--layout", choices=LAYOUTS, default="same",
                   help="llava-hf: write an original-layout LLaVA-1.5 checkpoint in the llava-hf layout")
    s.add_argument("--clip-dir", help="CLIP directory for --layout llava-hf when the checkpoint has no tower")
    s.add_argument("--dtype", choices=tuple(DTYPES),
                   help="the dtype the engine serves the export in (default: config.json's): scales are "
                        "rounded once to it, as the plugin rounds them, and config.json says it; SGLang "
                        "serves original-layout LLaVA-1.5 in float16")
    s.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    s.set_defaults(func=_convert)

    s = add("llava-processor", help="write the llava-hf tokenizer/processor files of an "
                       "original-layout LLaVA-1.5 checkpoint (SGLang's --tokenizer-path)")
    s.add_argument("checkpoint")
    s.add_argument("output")
    s.add_argument("--clip-dir", help="CLIP directory whose config sizes the image processor "
                                      "(default: $GRACE_CLIP_PATH, mm_vision_tower, the HF cache)")
    s.set_defaults(func=_llava_processor)

    s = add("fixture", help="generate a synthetic GRACE checkpoint (random weights)")
    s.add_argument("output")
    s.add_argument("--model", choices=("qwen3vl", "llava"), default="qwen3vl")
    s.add_argument("--size", default="tiny", help="tiny, or full size: 2b (qwen3vl) / 7b (llava)")
    s.add_argument("--format", default="qat-sidecar", choices=formats.names() if formats else None)
    s.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    s.set_defaults(func=_fixture)

    s = add("kernels", help="print the kernel table (second kernel per layer shape) the vLLM or "
                       "SGLang plugin uses on a device and engine version")
    s.add_argument("--device", help="device name as torch reports it (default: this machine's GPU)")
    s.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    s.add_argument("--engine-version", help="default: the installed engine's")
    s.add_argument("--table", help="an extra table file (as GRACE_QAT_CROSSOVER_FILE)")
    s.set_defaults(func=_kernels)

    s = add("demo", help="serve a checkpoint (default: a generated tiny one) with vLLM and ask "
                                    "an image+text question over the OpenAI API", add_help=False)
    s.add_argument("demo_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        # the demo owns its arguments (--help included): hand them over untouched, since argparse's
        # REMAINDER would take "--help" as grace-qat's own (unknown) option
        args = argparse.Namespace(func=_demo, demo_args=argv[1:])
    else:
        lean = not argv or argv[0] in ("-h", "--help", "--version")
        args = build_parser(full=not lean).parse_args(argv)
    try:
        return args.func(args)
    except GraceFormatError as e:     # the engines' messages start "grace_qat: "; say it once
        print(f"grace-qat: error: {str(e).removeprefix('grace_qat: ')}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"grace-qat: error: {e.filename or e}: not found", file=sys.stderr)
        return 2
    except OSError as e:           # e.g. an output the llava-processor cannot write
        print(f"grace-qat: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
