"""The benchmark's LitServe baseline: MNISTNet with the project's weights behind LitServe, run as its own process.

    .venv/bin/python -m bench.litserve_server --weights weights/mnistnet.pt --port 8600

It takes the project's JSON form (pixel intensities in [0, 1], ``[28][28]`` or ``[784]``) at ``POST /predict``
and answers ``{"predicted_class", "probabilities"}``, like the stock TorchServe handler (bench/baseline/). Settings
as LitServe's docs advise for a small CPU model: dynamic batching (8 requests / 2 ms), 2 inference workers
(one per core), one intra-op thread each, one API server. No authentication, no validation.
"""
from __future__ import annotations

import argparse
import sys

import litserve as ls
import torch


from models.mnist_net import MNISTNet
from models.registry import MNIST_MEAN, MNIST_STD


class MNISTAPI(ls.LitAPI):
    """Decode a JSON list, batch, forward, softmax/argmax per request."""

    def __init__(self, weights: str, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.weights = weights

    def setup(self, device):
        torch.set_num_threads(1)
        self.model = MNISTNet()
        self.model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        self.model.eval()

    def decode_request(self, request):
        return torch.tensor(request, dtype=torch.float32).reshape(784)

    def batch(self, inputs):
        return (torch.stack(inputs) - MNIST_MEAN) / MNIST_STD

    def predict(self, x):
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=1)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"predicted_class": int(output.argmax()), "probabilities": output.tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.litserve_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="MNISTNet state_dict (weights/mnistnet.pt)")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="max batch size (default 8)")
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds (default 0.002)")
    args = parser.parse_args(argv)
    api = MNISTAPI(args.weights, max_batch_size=args.batch, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
