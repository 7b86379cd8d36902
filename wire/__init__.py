"""What crosses the wire, for every side of it, shipped inside every archive (serve/package.py) next to
handlers/ and models/: the Open Inference Protocol codec (``wire.oip``), the way error messages show a
received JSON value (``wire.values``) and the ``[METRICS]`` lines a TorchServe worker prints for its
frontend (``wire.metric_lines``). numpy and the standard library only."""
