"""A plain (not forked) TorchServe worker with the worker patches: ``python run_worker.py SCRIPT ARGS``.

serve/torchserve/forkserver.py's client ``exec``s this for a worker command line when it cannot have the
worker forked (no fork server, or one that refuses); it installs the patches (serve/torchserve/worker.py)
and runs ``ts/model_service_worker.py`` as ``__main__``, as ``python SCRIPT ARGS`` would.
"""
import os
import sys

if __name__ == "__main__":
    # The folder that holds serve/ (the checkout, or /app in the image): on sys.path only while the patches
    # import, so that nothing else of it (handlers/, models/) can shadow what the archive ships.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    sys.path.insert(0, root)
    try:
        from serve.torchserve import worker
    finally:
        sys.path.remove(root)
    worker.run(sys.argv[1:])
