"""``foldserve fold``: a model (trainer checkpoint, ONNX file, torch.export program, TorchScript file) into a
verified repository entry, or one ONNX file into a folded file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import add_verify_flags, print_fold_report, verify_options
from foldserve.errors import ConfigError
from foldserve.records import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_METHOD,
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_PRECISION,
    PRECISIONS,
)

REQUIRES = ("torch", "onnx", "onnxruntime")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fold", help="fold a model into a verified model-repository entry, or fold an ONNX file",
                       description="MODEL is a foldserve checkpoint (file or run directory), an ONNX file (external "
                                   "data beside it), a torch.export program (torch.export.save, .pt2) or a "
                                   "TorchScript file (torch.jit.save); the kind is read from the content.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="the model to fold (see above)")
    p.add_argument("--repository", help="model repository directory (Triton layout)")
    p.add_argument("--name", help="model name (default: DATASET_ARCH for a checkpoint, else the file name's stem)")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--no-verify", action="store_true", help="skip verification (the server will not serve it "
                                                            "as ready unless told to)")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    g = p.add_argument_group("models brought from elsewhere (what a model may not say about itself)")
    g.add_argument("--input-shape", action="append", metavar="[NAME:]C,H,W",
                   help="per-sample input shape where the model's is symbolic (TorchScript records none); with "
                        "several inputs, once per input as NAME:C,H,W")
    g.add_argument("--normalize", action="append", metavar="[NAME:]MEAN,..:STD,..",
                   help="per-channel (x - mean) / std, baked into the served model (clients send raw data); with "
                        "several inputs, NAME: says which")
    g.add_argument("--input-name", metavar="NAME[,NAME..]",
                   help="name the served inputs, in order (default: the model's own)")
    g.add_argument("--output-name", metavar="NAME[,NAME..]",
                   help="name the served outputs, in order (default: the ONNX file's own; for a torch program "
                        "'output', its dict keys, or output_0, output_1, ...)")
    g.add_argument("--accuracy-output", metavar="NAME",
                   help="with several outputs: the classifier [batch, classes] whose accuracy --data's y measures")
    g.add_argument("--labels", help="class names, one a line (classification outputs [batch, classes])")
    p.add_argument("--data", help="real samples for verification: .npz with x [N, ...] (one array per input name "
                                  "for a model with several) and optional y [N] (class indices: accuracy is "
                                  "reported)")
    q = p.add_argument_group("precision (after the fold; the verifier gates fp16/int8 on top-1 agreement and accuracy)")
    q.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="fp16: float16 weights and activations, float32 inputs/outputs; int8: static QDQ "
                        "quantisation calibrated on training samples (or --data)")
    q.add_argument("--calibration-samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES,
                   help=f"int8: samples to calibrate on ({DEFAULT_CALIBRATION_SAMPLES})")
    q.add_argument("--calibration-data", help="int8: .npz (array x) to calibrate on instead of the training data "
                                              "(or the first samples of --data)")
    q.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=DEFAULT_CALIBRATION_METHOD,
                   help=f"int8: how activation ranges are chosen ({DEFAULT_CALIBRATION_METHOD})")
    p.add_argument("--install-unverified", action="store_true",
                   help="install the version even if its verification fails (by default it is kept aside as "
                        "NAME/.rejected-VERSION and the repository is unchanged)")
    p.add_argument("--onnx", help="fold this one ONNX file into --out OUT (no entry, no verification)")
    p.add_argument("--out", help="with --onnx: where to write the folded model (not the input itself)")
    add_verify_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.onnx:
        return _fold_file(args)
    if args.out:
        raise ConfigError("--out goes with --onnx; a MODEL is folded into --repository DIR")
    if not args.model or not args.repository:
        raise ConfigError("fold needs MODEL and --repository DIR (or --onnx IN --out OUT)")
    from cli.fold_args import parse_normalizes, parse_shapes
    from folding.export import FoldRequest, build_entry
    from folding.programs import Options
    from folding.verify import summary_table

    if args.precision == "fp16":
        from server.core.runtime import gpu_count

        if gpu_count() == 0:
            print("note: fp16 is for GPUs; no CUDA device is visible here, so this version will run on the CPU, where "
                  "onnxruntime casts around the operators it has no fp16 kernel for (usually slower than fp32). It is "
                  "folded and verified all the same", file=sys.stderr)
    options = Options(input_shape=parse_shapes(args.input_shape), normalize=parse_normalizes(args.normalize),
                      input_name=args.input_name, output_name=args.output_name, data=args.data,
                      calibration_data=args.calibration_data, accuracy_output=args.accuracy_output)
    result = build_entry(FoldRequest(
        args.model, args.repository, args.name, args.version, max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us, verify=not args.no_verify, verify_options=verify_options(args),
        force=args.force, install_unverified=args.install_unverified, options=options, labels_file=args.labels,
        precision=args.precision,
        calibration_method=args.calibration_method, calibration_samples=args.calibration_samples))
    print_fold_report(result.onnx_report)
    print(f"model: {result.version_dir}")
    if result.verification is not None:
        print(summary_table(result.verification))
        if not result.verification.passed:
            print(unverified_note(result))
        return 0 if result.verification.passed else 1
    return 0


def unverified_note(result) -> str:
    """What happened to a version whose verification failed, and what a server will do with it."""
    if not result.installed:
        return (f"not installed: the repository is unchanged, and a server keeps serving what it served. The "
                f"rejected version is kept at {result.version_dir} for inspection (foldserve verify "
                f"{result.version_dir}); --install-unverified installs such a version, which a server then serves "
                f"only when started with --allow-unverified")
    return (f"installed unverified (--install-unverified) as version {result.version}: a server refuses it unless "
            f"started with --allow-unverified (it keeps serving the version before, if any; with --strict-readiness "
            f"and no other version the model never becomes ready)")


def _fold_file(args: argparse.Namespace) -> int:
    if not args.out or args.model:
        raise ConfigError("fold --onnx IN.onnx needs --out OUT.onnx and no MODEL (to fold a model into a verified "
                          "entry: foldserve fold MODEL.onnx --repository DIR)")
    if args.repository or args.name or args.version is not None:
        raise ConfigError("--repository/--name/--version do not go with --onnx IN --out OUT (which writes one "
                          "file); fold MODEL --repository DIR instead")
    extra = [f for f, v in (("--data", args.data), ("--normalize", args.normalize), ("--labels", args.labels),
                            ("--input-shape", args.input_shape), ("--accuracy-output", args.accuracy_output),
                            ("--precision", args.precision != DEFAULT_PRECISION)) if v]
    if extra:
        raise ConfigError(f"{', '.join(extra)} go with MODEL --repository DIR (a verified entry), not with "
                          f"--onnx/--out")
    if Path(args.out).resolve() == Path(args.onnx).resolve():
        raise ConfigError(f"--out {args.out} is the input file: the unfolded original would be overwritten; "
                          f"choose another --out")
    from folding.export import fold_onnx_file

    report = fold_onnx_file(args.onnx, args.out)
    print_fold_report(report)
    print(f"wrote {args.out}")
    return 0
