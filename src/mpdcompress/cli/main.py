"""The ``mpdcompress`` command line. The only place that prints or exits."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError, MPDCompressError, UnknownNameError
from ..files.onnx import QUANTIZED_OPS
from ..models import MODELS, model_spec
from .arguments import device_name, nonnegative_int, opset, positive_int, quantization, seed
from .distill import add_distill_parser
from .models import add_mask_storage_argument, add_model_class_arguments
from .train import add_train_parser

# Where `mpdcompress bench` writes unless --out says otherwise (the CNN profile: results/bench_cnn).
BENCH_OUT = "results/bench"

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .demo import run_demo

    bar = tqdm(
        total=args.steps, desc=f"training LeNet-300-100 shape at c={args.compression}", unit="step", disable=args.quiet
    )

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    result = run_demo(compression=args.compression, steps=args.steps, seed=args.seed, progress=progress)
    bar.close()
    print(f"loss {result.first_loss:.3f} -> {result.last_loss:.3f} over {result.steps} steps (Adam, batch 50)")
    print(f"test accuracy (synthetic cluster task): {100 * result.test_accuracy:.2f} %")
    print(
        f"FC weights: dense {result.dense_fc_params:,} -> packed {result.packed_fc_params:,} "
        f"({result.dense_fc_params / result.packed_fc_params:.2f}x smaller)"
    )
    print(f"packed vs masked model: max |difference| / output scale = {result.max_rel_error:.2e}")
    print(f"packed vs dense forward at batch {result.speedup_batch}: {result.packed_speedup:.2f}x faster")
    ok = result.max_rel_error <= 1e-5
    print("exactness check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    import torch
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch.cuda.is_available() is False")
    command = ("mpdcompress bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])).strip()
    if args.device.startswith("cuda") and args.profile != "cnn":
        paths = _bench_gpu(args, command)
    else:
        if args.profile == "key":
            raise ConfigError("--profile key measures the GPU engine's targets: use it with --device cuda")
        run = _bench_cnn if args.profile == "cnn" else _bench_cpu
        bar = tqdm(desc="benchmarking", unit="config", disable=args.quiet)

        def progress(msg: str) -> None:
            bar.update(1)
            bar.set_postfix_str(msg)

        paths = run(args, command, progress)
        bar.close()
    for path in paths:
        print(f"wrote {path}")
    return 0


def _bench_profile(args: argparse.Namespace, base, shapes, what: str, **changes):
    """``base`` (a frozen benchmark profile) with the command line's shapes, factors, batches and
    models; unknown shape names and factors that fit no shape are refused."""
    import dataclasses

    if args.shapes:
        known = {s[0]: s for s in shapes}
        unknown = sorted(set(args.shapes) - set(known))
        if unknown:
            raise UnknownNameError(f"unknown {what}layer shapes {unknown}; choose from {sorted(known)}")
        changes["shapes"] = tuple(known[name] for name in args.shapes)
    for name in args.models or ():  # refused before any measurement, not after minutes of them
        model_spec(name)
    for key in ("factors", "batches", "models"):
        if getattr(args, key):
            changes[key] = tuple(getattr(args, key))
    profile = dataclasses.replace(base, **changes)
    if not any(c <= min(d_out, d_in) for _, d_out, d_in in profile.shapes for c in profile.factors):
        raise ConfigError(
            f"no layer shape takes the factors {list(profile.factors)}: each must be at most the "
            "smaller dimension of some shape"
        )
    return profile


def _bench_cpu(args: argparse.Namespace, command: str, progress) -> list:
    from ..bench.gpu import DTYPES
    from ..bench.report import write_bench_report
    from ..bench.suite import FULL, QUICK, run_suite

    changes: dict = {}
    if args.compile:
        changes["compile_mode"] = args.compile
    if args.no_rss:
        changes["rss_models"] = ()
    config = _bench_profile(args, QUICK if _profile_name(args) == "quick" else FULL, FULL.shapes, "", **changes)
    dtype = DTYPES[args.dtype or "fp32"]
    result = run_suite(config, device=args.device, dtype=dtype, command=command, progress=progress)
    return write_bench_report(result, args.out)


def _profile_name(args: argparse.Namespace) -> str:
    if args.quick and args.profile not in (None, "quick"):
        raise ConfigError(f"--quick and --profile {args.profile} ask for two different profiles")
    return "quick" if args.quick else (args.profile or "full")


def _bench_cnn(args: argparse.Namespace, command: str, progress) -> list:
    import dataclasses
    import json
    from pathlib import Path

    from ..atomic import write_atomic
    from ..bench.cnn import CnnProfile, render_cnn_report, run_cnn_bench

    changes = {"models": args.models, "factors": args.factors, "batches": args.batches, "layouts": args.layouts}
    profile = dataclasses.replace(
        CnnProfile(),
        fold_batchnorm=not args.keep_batchnorm,
        training_batch=CnnProfile.training_batch if args.training_batch is None else (args.training_batch or None),
        device=args.device,
        dtype=args.dtype or "fp32",
        **{k: tuple(v) for k, v in changes.items() if v},
    )
    unknown = sorted(set(profile.models) - set(MODELS))
    if unknown:
        raise UnknownNameError(f"unknown models {unknown}; registered: {', '.join(MODELS)}")
    out = Path("results/bench_cnn" if args.out == BENCH_OUT else args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(result: dict) -> None:  # after every row, so a run cut short keeps what it measured
        write_atomic(out / "bench_cnn.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
        write_atomic(out / "bench_cnn.md", lambda f: f.write(render_cnn_report(result).encode()))

    write(run_cnn_bench(profile, command=command, progress=progress, on_row=write))
    return [out / "bench_cnn.json", out / "bench_cnn.md"]


def _bench_gpu(args: argparse.Namespace, command: str) -> list:
    from ..bench.gpu import GPU_PROFILES, GPU_SHAPES, row_summary, run_gpu_suite
    from ..bench.gpu_report import write_gpu_report

    if args.compile:
        raise ConfigError("--compile is for the CPU suite; the GPU suite reports eager and CUDA-graph figures")
    changes = {"dtypes": (args.dtype,)} if args.dtype else {}
    profile = _bench_profile(args, GPU_PROFILES[_profile_name(args)], GPU_SHAPES, "GPU ", **changes)

    def on_row(section: str, row: dict, so_far: dict) -> None:
        # Each row as it is measured, and the report rewritten: a run cut short keeps every row.
        if not args.quiet:
            print(row_summary(section, row), flush=True)
        write_gpu_report(so_far, args.out)

    return write_gpu_report(run_gpu_suite(profile, device=args.device, command=command, on_row=on_row), args.out)


def _cmd_pack(args: argparse.Namespace) -> int:
    import os

    from ..core.batchnorm import fold_batchnorm_
    from ..core.convert import pack
    from ..files.io import read_manifest
    from .models import load_model_file

    manifest = read_manifest(args.checkpoint)
    if manifest["form"] == "packed":
        raise ConfigError(f"{args.checkpoint} is already packed")
    model = pack(load_model_file(args.checkpoint, args))
    if args.fold_batchnorm:
        before = _batchnorms(model)
        fold_batchnorm_(model.eval())
        print(f"folded {before - _batchnorms(model)} of {before} BatchNorm layers into their convolutions")
    out = _save_derived(model, args, manifest)
    before, after = os.path.getsize(args.checkpoint), os.path.getsize(out)
    print(f"wrote {out}: {after:,} bytes ({after / before:.3f} of the masked file's {before:,})")
    return 0


def _save_derived(model, args: argparse.Namespace, manifest: dict):
    """Write ``model``, made from the file ``manifest`` describes, to ``args.output`` with that
    file's input shape and user metadata, masks stored as ``--mask-storage`` says."""
    from ..files.io import save

    return save(
        model,
        args.output,
        input_shape=manifest.get("input_shape"),
        metadata=manifest.get("user"),
        mask_storage=args.mask_storage,
    )


def _batchnorms(model) -> int:
    from torch import nn

    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _cmd_quantize(args: argparse.Namespace) -> int:
    import os

    from ..core.convert import pack
    from ..core.quantize import quantize_
    from ..files.io import read_manifest
    from .models import load_model_file

    manifest = read_manifest(args.file)
    model = load_model_file(args.file, args)
    if manifest["form"] == "masked":
        model = pack(model)
    quantize_(model, args.format, dense_layers=args.dense_layers)
    out = _save_derived(model, args, manifest)
    before, after = os.path.getsize(args.file), os.path.getsize(out)
    packed = " (packed first)" if manifest["form"] == "masked" else ""
    print(
        f"wrote {out}{packed}: {args.format.describe()}, {after:,} bytes ({before / after:.1f}x smaller than {before:,})"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .summary import file_summary, model_summary

    if args.model and args.file:
        raise ConfigError("give a model file or --model NAME, not both")
    if args.model:
        s = model_summary(args.model, args.compression)
        paper = s["paper_fc_weights_dense"] is not None
        print(
            f"{s['model']} ({s['description']}) at c={s['compression']}"
            + (" (layers compressed as in the paper)" if paper else "")
        )
        for label, key in (("dense", "fc_weights_dense"), ("MPD  ", "fc_weights_mpd")):
            print(f"  FC weights {label}: {s[key]:>12,}" + (f"   paper: {s['paper_' + key]:>12,}" if paper else ""))
        if s["conv_weights_dense"] is not None:
            print(f"  conv weights dense: {s['conv_weights_dense']:>10,}")
            print(f"  conv weights MPD  : {s['conv_weights_mpd']:>10,}   (--compress-convs: all but the first)")
        return 0
    if not args.file:
        raise ConfigError("give a model file, or --model NAME for a paper model")
    s = file_summary(args.file)
    print(
        f"{s['path']}: {s['form']} model, written by {s['writer']}, "
        f"architecture {'included' if s['has_architecture'] else 'NOT included (load needs model=)'}"
    )
    print(f"{'layer':<28}{'was':<10}{'shape':>14}{'c':>5}{'dense':>14}{'kept':>12}{'stored':>12}  weights")
    for r in s["layers"]:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['name']:<28}{r['source']:<10}{shape:>14}{r['compression']:>5}{r['dense_weights']:>14,}"
            f"{r['kept_weights']:>12,}{r['stored_weights']:>12,}  {r['format']}"
        )
    dense_w = sum(r["dense_weights"] for r in s["layers"])
    kept_w = sum(r["kept_weights"] for r in s["layers"])
    print(f"compressed layers: {dense_w:,} -> {kept_w:,} weights ({dense_w / kept_w:.2f}x fewer)")
    for r in s["quantized_dense_layers"]:
        print(f"dense layer {r['name']} ({'x'.join(map(str, r['shape']))}) stored {r['format']}")
    if s["seeded_layers"]:
        print(
            f"masks of {len(s['seeded_layers'])} of {len(s['layers'])} layers stored as seed {s['mask_seed']} "
            "(drawn again on load, checked by digest)"
        )
    print(
        f"file: {s['file_bytes']:,} bytes; the same layers dense in fp32: {s['dense_compressed_layers_bytes']:,} bytes"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..files.io import read_manifest
    from .models import example_inputs, load_model_file, parse_dynamic_dims

    dims = parse_dynamic_dims(args.dynamic_dims)
    model = load_model_file(args.file, args)
    recorded = read_manifest(args.file).get("input_shape")
    shape = args.input_shape or recorded or _input_shape(model)
    inputs = example_inputs(model, args, tuple(shape) if shape else None)
    kind = args.format or ("executorch" if str(args.output).endswith(".pte") else "onnx")
    if args.quantized_ops != "dequantize" and kind != "onnx":
        raise ConfigError("--quantized-ops is for ONNX exports (ExecuTorch: --int8-activations)")
    if kind == "executorch":
        from ..files.executorch import export_executorch

        path = export_executorch(model, inputs, args.output, dynamic_dims=dims, int8_activations=args.int8_activations)
        target = "ExecuTorch, XNNPACK" + (", int8 activations" if args.int8_activations else "")
    else:
        from ..files.onnx import export_onnx

        path = export_onnx(
            model,
            inputs,
            args.output,
            opset=args.opset,
            dynamic_dims=dims,
            quantized_ops=args.quantized_ops,
            int8_activations=args.int8_activations,
        )
        target = f"ONNX opset {args.opset}"
        if args.int8_activations or args.quantized_ops == "matmulnbits":
            target += ", quantized linear layers as MatMulNBits" + (
                " with int8 activations" if args.int8_activations else ""
            )
    described = (
        ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
        if isinstance(inputs, dict)
        else f"input shape (batch, {', '.join(map(str, shape))})"
    )
    print(f"wrote {path} ({described}; dynamic {', '.join(f'{a}={n}' for a, n in dims.items())}; {target})")
    return 0


def _input_shape(model) -> tuple[int, ...] | None:
    from torch import nn

    first = next((m for m in model.modules() if not isinstance(m, (nn.Sequential, nn.ModuleList))), None)
    return (first.in_features,) if first is not None and hasattr(first, "in_features") else None


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..experiments import rerender_report, run_reproduction

    if args.render_only:
        print(f"wrote {rerender_report(args.out)}")
        return 0
    bar = tqdm(desc="reproducing", unit="step", disable=args.quiet)

    def progress(message: str) -> None:
        bar.update(1)
        bar.set_postfix_str(message)
        if message.endswith("%"):
            bar.write(message)

    run_reproduction(
        args.out, "quick" if args.quick else "full", data_root=args.data, seed=args.seed, progress=progress
    )
    bar.close()
    print(f"wrote {args.out}/report.md, results.json and figures")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpdcompress", description="Matrix permutation decomposition for PyTorch models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="mask, train, pack and check a small model on synthetic data")
    demo.add_argument("--compression", "-c", type=positive_int, default=10)
    demo.add_argument("--steps", type=positive_int, default=400)
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="time packed layers and models against dense, masked, CSR and BSR "
        "(--device cuda: the GPU suite, eager and CUDA graphs, against Monarch and 2:4 too)",
    )
    bench.add_argument("--quick", action="store_true", help="a few shapes and batches (about a minute)")
    bench.add_argument(
        "--profile",
        choices=("full", "quick", "key", "cnn"),
        help="what to measure (default full; quick = --quick); key (--device cuda): the GPU engine's key "
        "targets, FC6 and LLM-MLP up in bf16 at batches 1-2048, eager and CUDA graph, against dense and the "
        "bare block GEMM, the AlexNet FC stack and its compact training step, each row printed and written "
        "as it is measured; cnn: whole CNNs (Deep MNIST, TF-CIFAR10, AlexNet-BN, ResNet-18, VGG-11) with "
        "MPD on convolutions and FC layers against dense, FC-only MPD and a thin dense network of the same size "
        "(--models, --factors, --batches; written to results/bench_cnn unless --out)",
    )
    bench.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda[:N]")
    bench.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), help="default: fp32 on the CPU; fp32 and bf16 on a GPU"
    )
    bench.add_argument("--shapes", nargs="+", help="layer shapes by name (default: all)")
    bench.add_argument("--factors", nargs="+", type=positive_int, help="compression factors")
    bench.add_argument("--batches", nargs="+", type=positive_int, help="layer batch sizes")
    bench.add_argument("--models", nargs="+", help="model stacks (default: all)")
    bench.add_argument(
        "--layouts",
        nargs="+",
        choices=("channels_first", "channels_last"),
        help="cnn profile: memory formats each model runs in (default: both)",
    )
    bench.add_argument(
        "--keep-batchnorm",
        action="store_true",
        help="cnn profile: time BatchNorms as they train instead of folded into the convolutions (fold_batchnorm_)",
    )
    bench.add_argument(
        "--training-batch",
        type=nonnegative_int,
        help="cnn profile: batch of the timed Adam training steps (dense, masked, compact, thin dense; "
        "default 64, 0: none)",
    )
    bench.add_argument(
        "--compile",
        metavar="MODE",
        help="also torch.compile every model form with this mode (default, reduce-overhead, max-autotune)",
    )
    bench.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probes")
    bench.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: torch's choice)")
    bench.add_argument("--out", default=BENCH_OUT, help="output folder (JSON, markdown, PNG)")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=_cmd_bench)

    add_train_parser(sub)
    add_distill_parser(sub)

    rp = sub.add_parser("reproduce", help="run the paper's experiments on real data and write a report")
    rp.add_argument("--quick", action="store_true", help="fewer epochs and masks (minutes instead of hours)")
    rp.add_argument("--out", default="results/reproduction")
    rp.add_argument("--data", help="data folder (default $MPDCOMPRESS_DATA or ~/.cache/mpdcompress)")
    rp.add_argument("--seed", type=seed, default=0)
    rp.add_argument("--quiet", action="store_true")
    rp.add_argument(
        "--render-only", action="store_true", help="only rewrite report.md from the results.json in --out (no training)"
    )
    rp.set_defaults(func=_cmd_reproduce)

    pk = sub.add_parser("pack", help="pack a masked model file into block-diagonal form")
    pk.add_argument("checkpoint", help="masked model file written by mpdcompress (save or train)")
    pk.add_argument("-o", "--output", required=True)
    pk.add_argument(
        "--fold-batchnorm",
        action="store_true",
        help="for inference: fold each BatchNorm into the convolution before it (the file no longer trains as before)",
    )
    add_mask_storage_argument(pk)
    add_model_class_arguments(pk)
    pk.set_defaults(func=_cmd_pack)

    qz = sub.add_parser("quantize", help="store a model file's blocks as int8 or int4 (packing it first if masked)")
    qz.add_argument("file", help="model file written by mpdcompress (save, train or pack)")
    qz.add_argument("-o", "--output", required=True)
    qz.add_argument(
        "--format",
        type=quantization,
        default="int8",
        help="int8 (one scale per row), int8-dynamic (int8 activations on the CPU), int4 (groups of 32), "
        "int4-g64, int4-g128, and -asym for zero points (default int8)",
    )
    qz.add_argument(
        "--dense-layers",
        action="store_true",
        help="also the nn.Linear layers the packed model keeps dense (the classifier, a folded head or tail), "
        "in the same format",
    )
    add_mask_storage_argument(qz)
    add_model_class_arguments(qz)
    qz.set_defaults(func=_cmd_quantize)

    ins = sub.add_parser("inspect", help="layers, factors, parameter counts and size of a model file or paper model")
    ins.add_argument("file", nargs="?")
    ins.add_argument("--model", choices=list(MODELS), help="a registered model instead of a file")
    ins.add_argument("--compression", "-c", type=positive_int)
    ins.set_defaults(func=_cmd_inspect)

    ex = sub.add_parser("export", help="export a model file to ONNX or ExecuTorch")
    ex.add_argument("file")
    ex.add_argument("-o", "--output", required=True, help="model.onnx, or model.pte for ExecuTorch")
    ex.add_argument(
        "--format",
        choices=("onnx", "executorch"),
        help='default: executorch for a .pte output, else onnx (ExecuTorch: pip install "mpdcompress[mobile]")',
    )
    ex.add_argument("--input-shape", nargs="+", type=positive_int, help="input shape without the batch dimension")
    ex.add_argument("--opset", type=opset, default=18)
    ex.add_argument(
        "--int8-activations",
        action="store_true",
        help="run quantized linear layers in int8 kernels (ExecuTorch: XNNPACK's; ONNX: ONNX Runtime's MatMulNBits), "
        "activations rounded to int8 on the fly (faster; close to, not exactly, the weight-only output)",
    )
    ex.add_argument(
        "--quantized-ops",
        choices=QUANTIZED_OPS,
        default="dequantize",
        help="ONNX: dequantize integer weights with standard operators (any runtime), or run int4 linear layers as "
        "ONNX Runtime's MatMulNBits (com.microsoft), which keeps them 4-bit",
    )
    ex.add_argument(
        "--example-inputs",
        metavar="FILE",
        help="safetensors file of example input tensors, passed to forward by name (input_ids, attention_mask...)",
    )
    ex.add_argument(
        "--input-dtype",
        choices=("float32", "int64"),
        default="float32",
        help="random example's dtype; int64 draws token ids for a model that starts with an embedding",
    )
    ex.add_argument(
        "--dynamic-dims",
        nargs="+",
        default=["0=batch"],
        metavar="AXIS=NAME",
        help="dimensions of every input that may change at run time (default 0=batch; e.g. 0=batch 1=sequence)",
    )
    add_model_class_arguments(ex)
    ex.set_defaults(func=_cmd_export)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, MPDCompressError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")  # not "[Errno 21] ..."
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MPDCompressError, OSError) as exc:
        # Our own errors and the file system's (unwritable output, full disk) are the user's to
        # fix: one line. Anything else is a bug in mpdcompress and keeps its traceback.
        print(f"mpdcompress {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mpdcompress {args.command}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
