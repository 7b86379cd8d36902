"""Test-only TorchServe handler (function entry point) for tests/reliability/test_faults.py: a model that
misbehaves on request. Never packaged for serving: test_faults.py zips it into a private ``faulty.mar``.

* a request whose body contains ``hang`` never returns (the worker sleeps forever): TorchServe's
  ``responseTimeout`` (the archive's model-config.yaml) must answer the client and replace the worker;
* any other request is answered ``{"ok": true, "pid": <worker pid>}``;
* loading sleeps as many seconds as the file ``$FAULT_CONTROL_DIR/slow_load`` says (when it exists), so a
  test can hold a restarted worker out of READY long enough to see the readiness probe say so.

Standard library only: the archive holds this file and nothing else.
"""
import json
import os
import time


def _text(row: dict) -> str:
    body = row.get("body", row.get("data"))
    if isinstance(body, (bytes, bytearray)):
        return bytes(body).decode(errors="replace")
    return body if isinstance(body, str) else json.dumps(body)


def handle(data, context):
    if data is None:  # TorchServe's load call
        control = os.environ.get("FAULT_CONTROL_DIR")
        slow = os.path.join(control, "slow_load") if control else None
        if slow and os.path.isfile(slow):
            with open(slow) as file:
                seconds = float(file.read().strip() or 0)
            print(f"fault_handler: loading for {seconds:g} s", flush=True)  # model_log.log: tests wait for it
            time.sleep(seconds)
        return None
    answers = []
    for row in data:
        if "hang" in _text(row):
            while True:
                time.sleep(3600)
        answers.append(json.dumps({"ok": True, "pid": os.getpid()}))
    return answers
