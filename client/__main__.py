"""``python -m client``: talk to the running service from the command line.

    python -m client predict mnistnet --png examples/digit_7.png
    python -m client predict mnistnet --json examples/digit_7.json [--v2 | --binary] [--version 1.0]
    python -m client predict mnistnet --npy batch.npy          # (28, 28), (784,), (N, 28, 28) or (N, 784)
    python -m client predict regressionnet --data '[[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]'
    python -m client explain mnistnet --png examples/digit_7.png --out heat.png [--target 7] [--steps 50]
    python -m client page [--port 8765] [--model mnistnet]   # a local digit page (draw, see probabilities + saliency)
    python -m client models | describe mnistnet | health
    python -m client sample-digits --out examples/              # real MNIST test digits as PNG + JSON

Options before the command: ``--url`` (inference, default http://127.0.0.1:8080), ``--management-url``
(default http://127.0.0.1:8081), ``--token`` (inference key; default found as client/api.py says).
Exit status: 0 success, 1 the server refused or failed (its status and message are printed), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from client.api import TorchServeClient, TorchServeError, v2_request

SAMPLE_JSON_DIGIT = 7  # the digit also written as JSON (plain and v2) by sample-digits


# -------------------------------------------------------------------------------------- predict

def load_input(args: argparse.Namespace):
    """The request payload named by exactly one of --png/--npy/--json/--data."""
    if args.png:
        return Path(args.png).read_bytes()
    if args.npy:
        return np.load(args.npy, allow_pickle=False)
    if args.json:
        return json.loads(Path(args.json).read_text())
    return json.loads(args.data)


def format_result(result) -> str:
    """One JSON object per line: a list response (N samples) prints one line per sample."""
    if isinstance(result, list):
        return "\n".join(json.dumps(item) for item in result)
    return json.dumps(result)


def as_batch(array: np.ndarray) -> np.ndarray:
    """Add the leading N=1 axis v2 shapes need to a single sample: one row / flat image (1-D) or one
    28x28 image; anything else is taken to be a batch already."""
    if array.ndim == 1 or array.shape == (28, 28):
        return array.reshape(1, *array.shape)
    return array


def cmd_predict(client: TorchServeClient, args: argparse.Namespace) -> int:
    payload = load_input(args)
    if args.v2 or args.binary:
        if isinstance(payload, (bytes, bytearray)):
            raise ValueError("--v2 needs numbers (--npy, --json or --data), not an image file")
        if not (isinstance(payload, dict) and "inputs" in payload):
            values = payload.get("data", payload) if isinstance(payload, dict) else payload
            array = np.asarray(values, dtype=np.float32)
            payload = as_batch(array)
        result = client.predict_v2(args.model, payload, version=args.version, binary=args.binary)
        for output in result.get("outputs", []):
            if isinstance(output.get("data"), np.ndarray):
                output["data"] = output["data"].ravel().tolist()
    else:
        result = client.predict(args.model, payload, version=args.version)
    print(format_result(result))
    return 0


# -------------------------------------------------------------------------------------- explain

def cmd_explain(client: TorchServeClient, args: argparse.Namespace) -> int:
    """Ask for an Integrated Gradients explanation; print it (without the map) and write the overlay PNG(s)."""
    from client.heatmap import digit_pixels, write_overlay

    payload = load_input(args)
    result = client.explain(args.model, payload, version=args.version, target=args.target, steps=args.steps)
    answers = result if isinstance(result, list) else [result]
    for answer in answers:
        summary = {key: value for key, value in answer.items() if key not in ("attributions", "probabilities")}
        print(json.dumps(summary))
    if args.out and answers and np.size(answers[0].get("attributions")) == 784:
        out = Path(args.out)
        if len(answers) == 1:
            paths = [write_overlay(out, digit_pixels(payload), answers[0])]
        else:  # one picture per image: heat_0.png, heat_1.png, ...
            images = payload.get("data", payload) if isinstance(payload, dict) else payload
            paths = [write_overlay(out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}"), digit_pixels(image), answer)
                     for i, (image, answer) in enumerate(zip(images, answers))]
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------- sample digits

def sample_digits(out: Path, digits: list[int]) -> list[Path]:
    """Write the first MNIST test image of each digit in ``digits`` as ``out/digit_<d>.png`` (28x28,
    8-bit grayscale, white on black, exact MNIST pixels), plus ``digit_7.json`` ({"data": 28x28
    intensities in [0, 1]}) and ``digit_7_v2.json`` (the same as an Open Inference Protocol request)."""
    from PIL import Image

    from train.data import mnist_arrays  # the project's checksum-verified MNIST reader

    images, labels = mnist_arrays("test")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for digit in digits:
        index = int(np.flatnonzero(labels == digit)[0])
        path = out / f"digit_{digit}.png"
        Image.fromarray(images[index], mode="L").save(path, optimize=True)
        written.append(path)
        if digit == SAMPLE_JSON_DIGIT:
            intensities = np.round(images[index] / 255.0, 6)
            json_path = out / f"digit_{digit}.json"
            json_path.write_text(json.dumps({"data": intensities.tolist()}) + "\n")
            v2_path = out / f"digit_{digit}_v2.json"
            body = v2_request(intensities.reshape(1, 28, 28).astype(np.float32), request_id=f"mnist-test-{index}")
            body["inputs"][0]["data"] = intensities.ravel().tolist()  # keep the 6-digit rounding readable
            v2_path.write_text(json.dumps(body) + "\n")
            written += [json_path, v2_path]
        print(f"{path}: MNIST test image #{index}, label {digit}")
    return written


# ------------------------------------------------------------------------------------------ CLI

def add_input_source(command: argparse.ArgumentParser) -> None:
    """The one required input of ``predict`` and ``explain``: an image file, a .npy array or JSON."""
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--png", help="PNG/JPEG file, sent as the raw body")
    source.add_argument("--npy", help=".npy array, sent as {\"data\": ...}")
    source.add_argument("--json", help="JSON file, sent as is")
    source.add_argument("--data", help="JSON text, sent as is, e.g. '[[0.5, 0.5]]'")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description="Client for the TorchServe service.")
    parser.add_argument("--url", help="inference API (default $TS_INFERENCE_URL or http://127.0.0.1:8080)")
    parser.add_argument("--management-url", help="management API (default $TS_MANAGEMENT_URL or :8081)")
    parser.add_argument("--token", help="inference key (default $TS_INFERENCE_KEY, else key_file.json)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="send one request to /predictions/<model>")
    predict.add_argument("model")
    add_input_source(predict)
    predict.add_argument("--version", help="model version, e.g. 1.0 (default: the default version)")
    predict.add_argument("--v2", action="store_true", help="send as an Open Inference Protocol v2 request")
    predict.add_argument("--binary", action="store_true",
                         help="v2 with binary tensors (the binary tensor data extension) both ways")

    explain = commands.add_parser("explain", help="Integrated Gradients explanation from /explanations/<model>")
    explain.add_argument("model")
    add_input_source(explain)
    explain.add_argument("--out", help="write the digit with the heatmap over it to this PNG (digit models)")
    explain.add_argument("--target", type=int, help="class to explain (default: the predicted class)")
    explain.add_argument("--steps", type=int, help="integration steps (default 50, at most 256)")
    explain.add_argument("--version", help="model version, e.g. 1.0 (default: the default version)")

    page = commands.add_parser("page", help="local digit page: draw or drop a digit, see probabilities and saliency")
    page.add_argument("--model", default="mnistnet", help="digit model to ask (default mnistnet)")
    page.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    page.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")

    commands.add_parser("models", help="list the served models")
    describe = commands.add_parser("describe", help="workers and settings of one model")
    describe.add_argument("model")
    commands.add_parser("health", help="GET /ping")
    samples = commands.add_parser("sample-digits", help="export real MNIST test digits as PNG/JSON examples")
    samples.add_argument("--out", type=Path, default=Path("examples"), help="output directory (default examples/)")
    samples.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="which digits (default 0-9)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "sample-digits":
        sample_digits(args.out, [int(d) for d in args.digits.split(",")])
        return 0
    client = TorchServeClient(args.url, args.management_url, token=args.token, timeout=args.timeout)
    try:
        if args.command == "predict":
            return cmd_predict(client, args)
        if args.command == "explain":
            return cmd_explain(client, args)
        if args.command == "page":
            from client.page import serve_page

            return serve_page(client, args.model, args.host, args.port)
        if args.command == "models":
            for model in client.list_models():
                print(f"{model['modelName']:16s} {model['modelUrl']}")
        elif args.command == "describe":
            print(json.dumps(client.describe(args.model), indent=2))
        elif args.command == "health":
            print(json.dumps(client.health()))
        return 0
    except TorchServeError as exc:
        print(f"error {exc.status or ''}: {exc.message}".replace("error : ", "error: "), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
