"""The stock baseline handler: what a user writes on top of TorchServe's BaseHandler.

The request body is the project's JSON form, pixel intensities in [0, 1] (one image ``[28][28]`` or
``[784]``, or a batch ``[[784], ...]``); TorchServe's worker has already parsed it (content type
``application/json``), and ``preprocess`` turns it into a tensor with ``torch.tensor`` and normalises
it like training — no validation, no other formats. The response for each request is
``{"predicted_class": ..., "probabilities": [...]}`` for a single image, or a list of those for a batch,
serialised by TorchServe's default encoder. BaseHandler.initialize loads the model file and the
state_dict from the archive.
"""
import json

import torch
from ts.torch_handler.base_handler import BaseHandler

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # models/registry.py's, spelled out: a stock handler imports nothing of ours


class BaselineMNISTHandler(BaseHandler):
    """BaseHandler with ``torch.tensor(json list)`` preprocessing and softmax/argmax postprocessing."""

    def preprocess(self, data):
        """One normalised float tensor ``(N, 784)`` for the whole TorchServe batch; remembers each request's N."""
        tensors = []
        self._counts = []
        for row in data:
            body = row.get("data") if row.get("data") is not None else row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            tensor = torch.tensor(body, dtype=torch.float32)
            single = tensor.numel() == 784 and tensor.dim() <= 2
            tensors.append(tensor.reshape(-1, 784))
            self._counts.append(None if single else tensors[-1].shape[0])
        return (torch.cat(tensors) - MNIST_MEAN) / MNIST_STD

    def postprocess(self, data):
        """Per request: one result dict for a single image, a list of dicts for a batch."""
        probabilities = torch.softmax(data, dim=1)
        results = [
            {"predicted_class": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities
        ]
        out, start = [], 0
        for count in self._counts:
            if count is None:
                out.append(results[start])
                start += 1
            else:
                out.append(results[start:start + count])
                start += count
        return out
