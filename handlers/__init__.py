"""Custom TorchServe handlers and the shared input decoding they use (see handlers/decoding.py)."""
