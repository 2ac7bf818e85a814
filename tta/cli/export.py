"""`tta export`: ONNX export of a model card (frozen / alpha-bn / features) and TensorRT engines.

    tta export onnx --model resnet20-fmnist --out r20_abn.onnx --mode alpha-bn --source-weight 0.9
    tta export trt --onnx r20_abn.onnx --out r20_abn.engine --fp16 --min-batch 1 --opt-batch 64 --max-batch 256
"""

from __future__ import annotations

import argparse
import sys

from tta.cli.checks import check_out_file


def _batch(value: str) -> str | int:
    if value == "dynamic":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be 'dynamic' or a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch must be >= 1, got {n}")
    return n


def _real_inputs(card_name: str, n: int, data_dir: str | None):  # noqa: ANN202 - torch.Tensor | None
    """A Fashion-MNIST test batch when the card was trained on it (a real-input check), else None."""
    import torch

    from tta.models import get_card

    card = get_card(card_name)
    if n <= 0 or (card.dataset or "").lower() not in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return None
    from tta.streams.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test", data_dir)
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 255.0
    return x[:, : card.in_chans]


def run_onnx(args: argparse.Namespace) -> int:
    from tta.errors import DataNotFoundError
    from tta.export import export_onnx
    from tta.models import get_card

    get_card(args.model)  # an unknown card is one error line, before the real-input check
    check_out_file(args.out)
    try:
        real = _real_inputs(args.model, args.real_images, args.data_dir)
    except DataNotFoundError as exc:
        print(f"tta export onnx: no real-input check ({exc})", file=sys.stderr)
        real = None
    report = export_onnx(args.model, args.out, mode=args.mode, batch=args.batch, opset=args.opset,
                         source_weight=args.source_weight, real_inputs=real)
    print(report.summary())
    return 0


def run_trt(args: argparse.Namespace) -> int:
    from tta.export import build_trt_engine

    check_out_file(args.out)
    report = build_trt_engine(args.onnx, args.out, fp16=args.fp16, min_batch=args.min_batch,
                              opt_batch=args.opt_batch, max_batch=args.max_batch,
                              workspace_bytes=int(args.workspace_mib) << 20)
    print(f"wrote {report.path}: TensorRT {report.tensorrt_version}, {report.precision}, "
          f"batch profile {report.profile or 'fixed'}")
    return 0


def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model card name or YAML path (default: the default card)")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--mode", choices=("frozen", "alpha-bn", "features"), default="frozen")
    parser.add_argument("--batch", type=_batch, default="dynamic", help="'dynamic' (default) or a fixed batch size")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18-20 (default 18)")
    parser.add_argument("--source-weight", type=float, default=None,
                        help="alpha-BN weight of the source statistics (alpha-bn default 0.9; features: alpha-BN features)")
    parser.add_argument("--real-images", type=int, default=64,
                        help="test-split images of the card's dataset to compare on (0: random inputs only)")
    parser.add_argument("--data-dir", default=None, help="dataset folder for the real-input check")


def add_trt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", required=True, help="ONNX file written by `tta export onnx`")
    parser.add_argument("--out", required=True, help="output serialised engine")
    parser.add_argument("--fp16", action="store_true", help="fp16 engine (builder flag on TensorRT 10, fp16 graph on 11)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--workspace-mib", type=int, default=1024)


def _with_default_model(func):  # noqa: ANN001, ANN202
    def run(args: argparse.Namespace) -> int:
        if args.model is None:
            from tta.models import DEFAULT_CARD

            args.model = DEFAULT_CARD
        return func(args)

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a model to ONNX / TensorRT", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    inner = parser.add_subparsers(dest="target", metavar="TARGET")
    onnx_parser = inner.add_parser("onnx", help="ONNX export (frozen, alpha-bn or features), verified with onnxruntime")
    add_onnx_arguments(onnx_parser)
    onnx_parser.set_defaults(func=_with_default_model(run_onnx))
    trt_parser = inner.add_parser("trt", help="TensorRT engine from an exported ONNX file (needs `pip install 'tta-runtime[trt]'`)")
    add_trt_arguments(trt_parser)
    trt_parser.set_defaults(func=run_trt)


def main(argv: list[str] | None = None) -> int:
    from tta.cli import main as tta_main

    return tta_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
