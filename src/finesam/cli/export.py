"""`finesam export`: the model (with HQ-SAM, LoRAs) as an ONNX image encoder and prompt decoder (docs/onnx.md)."""

import argparse
import importlib.util
import sys
from pathlib import Path

from finesam.cli.common import UsageError, check_output_folder, load_model
from finesam.cli.options import Commands, add_command
from finesam.onnx import interface as io
from finesam.weights import output_error


def run_export(args: argparse.Namespace) -> None:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"export needs {' and '.join(missing)}: pip install 'finesam[onnx]'")
    from finesam.onnx.export import check_interface, check_opset, export

    check_output_folder(args.out, "--out")
    check_opset(args.opset)
    model = load_model(args)
    try:
        check_interface(model, args.encoder_input, args.hq_decoder)
    except ValueError as e:
        raise UsageError(str(e)) from None  # HQ-SAM, then the LoRAs (finesam.adapters.order); export has no --compile
    try:
        report = export(
            model,
            args.out,
            multimask_output=args.multimask,
            opset=args.opset,
            quantize=args.quantize,
            encoder_input=args.encoder_input,
            hq_decoder=args.hq_decoder,
        )
    except OSError as e:  # disk full in the staging folder, say: the earlier export in --out is untouched
        raise output_error(Path(e.filename) if e.filename else args.out, e) from None
    for name in report.files:
        print(args.out / name)
    for name in report.files:
        if name.endswith(io.EXTERNAL_DATA_SUFFIX):
            model_file = name.removesuffix(io.EXTERNAL_DATA_SUFFIX)
            print(
                f"{model_file} is over protobuf's 2 GB: its weights are in {name}; keep the two together",
                file=sys.stderr,
            )
    print(report.summary(), file=sys.stderr)


def add_commands(commands: Commands) -> None:
    export = add_command(
        commands,
        "export",
        "the model as ONNX: image encoder + prompt decoder with the official SAM ONNX interface",
        description="the model as ONNX: image encoder + prompt decoder with the official SAM ONNX interface "
        "(docs/onnx.md; SAM 2 adds its high-resolution features)\n\nWrites OUT/encoder.onnx, OUT/decoder.onnx and "
        "OUT/model.json (and with --quantize the int8 *.quant.onnx); LoRAs are folded into the weights they adapt.",
    )
    group = export.add_argument_group("model")
    group.add_argument(
        "--weights", type=Path, required=True, help="converted .safetensors or official .pth (SAM 2: .pt)"
    )
    group.add_argument("--hq", type=Path, metavar="HQ.safetensors", help="HQ-SAM weights (or an official HQ-SAM .pth)")
    group.add_argument(
        "--hq-only", action="store_true", help="with HQ-SAM: the HQ mask alone instead of SAM's mask + the HQ mask"
    )
    group.add_argument(
        "--lora", type=Path, action="append", default=[], metavar="LORA.safetensors", help="merged in; repeatable"
    )
    export.add_argument("--out", type=Path, required=True, help="the output folder")
    export.add_argument(
        "--multimask",
        action="store_true",
        help="the decoder outputs SAM's three candidate masks (HQ-SAM: one; HQ-SAM 2: three, each + the HQ mask)",
    )
    export.add_argument("--opset", type=int, default=io.OPSET, help="ONNX opset")
    export.add_argument("--quantize", action="store_true", help="also int8 models (onnxruntime dynamic quantisation)")
    export.add_argument(
        "--encoder-input",
        choices=io.ENCODER_INPUTS,
        default=io.TENSOR_INPUT,
        help="tensor: the preprocessed (1, 3, S, S) model input; pixels: the resized RGB image (H, W, 3), normalised "
        "and padded inside the graph (samexporter's runners; SAM 1 and TinyViT)",
    )
    export.add_argument(
        "--hq-decoder",
        choices=io.HQ_DECODERS,
        default=io.HQ_FEATURES_DECODER,
        help="with HQ-SAM: features (the encoder computes the fused hq_features once per image) or official (the "
        "official HQ-SAM ONNX decoder's interm_embeddings input)",
    )
    export.set_defaults(run=run_export, device="cpu", dtype="float32", large_tensors=True)
