"""gRPC load generator: one image per Open Inference Protocol ``ModelInfer``, a fixed number of calls in flight.

    .venv/bin/python -m bench.grpcload                           # null ceiling, then Triton, then ours
    .venv/bin/python -m bench.grpcload --sides null --seconds 5   # only the generator's own ceiling
    .venv/bin/python -m bench.grpcload --target 127.0.0.1:7070 --token KEY   # a server already running

The generator is a ``grpc.aio`` closed loop: one channel (one HTTP/2 connection, as ``tritonclient.grpc``
opens), ``--in-flight`` coroutines (default 16) that each send the next call as soon as their last one is
answered, and one prebuilt ``ModelInferRequest`` (tritonclient's generated stubs; one MNIST test digit as a
FP32 ``raw_input_contents`` blob, both outputs asked for), so a call costs the generator only gRPC's own
work. Reported: calls/s, p50/p99, and the generator's own CPU per call (process time over the window).

Its ceiling is measured against ``null``: a ``grpc.aio`` server of the same service in another process whose
``ModelInfer`` returns a prebuilt answer without looking at the request. On 2 shared cores the null server
takes CPU from the generator, so that rate is a lower bound of the ceiling; ``1e6 / CPU µs per call`` is the
generator's ceiling on one free core. A served rate well below both is the server's, not the generator's.
Every answer from a real server is checked first: the digit's class, as the in-process model gives it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from paths import REPO_ROOT, WEIGHTS_DIR

MODEL = "mnistnet"
OUTPUTS = ("probabilities", "predicted_class")
GENERATOR = ("grpc.aio closed loop, one channel, a ModelInferRequest (tritonclient's generated stubs) serialised "
             "once, answers left as bytes")
MAX_MESSAGE = 64 * 1024 * 1024


def infer_request(images: np.ndarray):
    """A ``ModelInferRequest`` of FP32 ``images (N, 784)`` as one raw blob, both outputs asked for."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend(images.shape)
    request.raw_input_contents.append(np.ascontiguousarray(images, dtype="<f4").tobytes())
    for name in OUTPUTS:
        request.outputs.add().name = name
    return request


def predicted_classes(response) -> np.ndarray:
    """``predicted_class`` from a ``ModelInferResponse`` with raw output contents (INT64)."""
    for i, output in enumerate(response.outputs):
        if output.name == "predicted_class":
            return np.frombuffer(response.raw_output_contents[i], dtype="<i8")
    raise RuntimeError(f"no predicted_class output in {[o.name for o in response.outputs]}")


async def _load(target: str, request, in_flight: int, seconds: float, warmup: float, metadata) -> dict:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        from tritonclient.grpc import service_pb2

        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        first = await stub.ModelInfer(request, metadata=metadata, timeout=30)
        # The timed calls send the request's bytes serialised once and keep the answer's bytes unparsed.
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        payload = request.SerializeToString()
        if service_pb2.ModelInferResponse.FromString(await raw(payload, metadata=metadata, timeout=30)) != first:
            raise RuntimeError("the raw call's answer differs from the stub's")
        latencies: list[float] = []
        errors = 0
        start = time.perf_counter() + warmup
        end = start + seconds

        async def caller():
            nonlocal errors
            while (sent := time.perf_counter()) < end:
                try:
                    await raw(payload, metadata=metadata, timeout=30)
                    ok = True
                except grpc.aio.AioRpcError:
                    ok = False
                if sent >= start:
                    if ok:
                        latencies.append(time.perf_counter() - sent)
                    else:
                        errors += 1

        tasks = [asyncio.create_task(caller()) for _ in range(in_flight)]
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu_start = time.process_time()
        await asyncio.gather(*tasks)
        cpu = time.process_time() - cpu_start
    latencies.sort()
    n = len(latencies)
    return {"first": first, "calls": n, "errors": errors, "seconds": seconds, "calls_per_s": n / seconds,
            "p50_ms": latencies[n // 2] * 1e3 if n else None,
            "p99_ms": latencies[min(n - 1, int(0.99 * n))] * 1e3 if n else None,
            "generator_cpu_us_per_call": cpu / max(1, n + errors) * 1e6, "in_flight": in_flight,
            "generator": GENERATOR}


def run(target: str, in_flight: int = 16, seconds: float = 5.0, warmup: float = 1.0, token: str | None = None,
        images: np.ndarray | None = None) -> dict:
    """``in_flight`` concurrent ``ModelInfer`` calls of ``images`` (default one test digit) at ``target`` (loopback
    only) for ``seconds`` after ``warmup``; the result's ``first`` is the first answer (for checking)."""
    if not target.startswith(("127.", "localhost:", "[::1]:")):
        raise ValueError(f"load is only ever sent to loopback addresses, got {target}")
    if images is None:
        from bench.sweep import digits

        images = digits(1)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return asyncio.run(_load(target, infer_request(images), in_flight, seconds, warmup, metadata))


# ------------------------------------------------------------------------------------------ null server

async def _null_server(address: str) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    answer = service_pb2.ModelInferResponse(model_name=MODEL, model_version="1")
    for name, datatype, shape, blob in (("probabilities", "FP32", [1, 10], np.full(10, 0.1, "<f4").tobytes()),
                                        ("predicted_class", "INT64", [1], np.zeros(1, "<i8").tobytes())):
        output = answer.outputs.add()
        output.name, output.datatype = name, datatype
        output.shape.extend(shape)
        answer.raw_output_contents.append(blob)

    class Null(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):  # noqa: N802 - the service's name
            return answer

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Null(), server)
    server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


class NullServer:
    """``python -m bench.grpcload --null-server ADDRESS`` as its own process (so it has its own GIL)."""

    def __init__(self):
        from serve.server import port_is_free

        port = next(p for p in range(8900, 9000) if port_is_free(p))
        self.grpc_address = f"127.0.0.1:{port}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "NullServer":
        self._process = subprocess.Popen([sys.executable, "-m", "bench.grpcload", "--null-server", self.grpc_address],
                                         cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        if self._process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the null gRPC server did not start (exit code {self._process.poll()})")
        return self

    def keys(self) -> dict:
        return {}

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


# ------------------------------------------------------------------------------------------------ main

def describe(result: dict) -> str:
    return (f"{result['calls_per_s']:>8,.0f} calls/s  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
            f"errors {result['errors']}  generator CPU {result['generator_cpu_us_per_call']:5.0f} µs/call "
            f"(ceiling on one free core {1e6 / result['generator_cpu_us_per_call']:,.0f} calls/s)")


def measure_side(side: str, server, in_flight: int, seconds: float, warmup: float, expected: int | None) -> dict:
    result = run(server.grpc_address, in_flight, seconds, warmup, server.keys().get("inference"))
    if expected is not None:
        got = predicted_classes(result["first"])
        if got.tolist() != [expected]:
            raise RuntimeError(f"{side}: predicted_class {got.tolist()}, the in-process model says {expected}")
    result.pop("first")
    print(f"  {side:<7}{describe(result)}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpcload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="null,triton,ours", help="of null, triton, ours (default all, in turn)")
    parser.add_argument("--target", help="host:port of a running server instead of --sides")
    parser.add_argument("--token", help="inference key for --target (sent as authorization metadata)")
    parser.add_argument("--in-flight", type=int, default=16, help="calls in flight (default 16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per side (default 5)")
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="seconds of the same load first (default 20: the JVM is still compiling before)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--null-server", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.null_server:
        asyncio.run(_null_server(args.null_server))
        return 0
    print(f"generator: {GENERATOR}, {args.in_flight} in flight; 1-min load {os.getloadavg()[0]:.2f}", flush=True)
    if args.target:
        result = run(args.target, args.in_flight, args.seconds, args.warmup, args.token)
        result.pop("first")
        print(f"  {args.target}: {describe(result)}")
        return 0
    from bench.sweep import digits, reference, served

    weights = args.weights_dir.resolve() / f"{MODEL}.pt"
    expected = int(reference(digits(1), weights).argmax())
    results = {}
    for side in [s for s in args.sides.split(",") if s]:
        if side == "null":
            with NullServer() as server:
                results[side] = measure_side("null", server, args.in_flight, args.seconds, args.warmup, None)
        elif side in ("ours", "triton"):
            with served(side, args.weights_dir.resolve()) as server:
                results[side] = measure_side(side, server, args.in_flight, args.seconds, args.warmup, expected)
        else:
            parser.error(f"--sides takes null, triton, ours; got {side!r}")
    if "ours" in results and "triton" in results:
        print(f"ours / triton: {results['ours']['calls_per_s'] / results['triton']['calls_per_s']:.2f}x calls/s")
    print(f"1-min load {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
