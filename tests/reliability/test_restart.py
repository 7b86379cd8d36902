"""Stop, then start again at once, after traffic on every port: the restart is not refused.

A stopped server leaves the connections it closed in TIME-WAIT on its own ports for about a minute. The
servers themselves bind with SO_REUSEADDR and would start, so the start-up port check must not count those
(it used to: "port(s) already in use: 7070 (oip_grpc)" after any gRPC call). Here: a real server gets
traffic on every port it listens on (REST inference, management, metrics, OIP gRPC, TorchServe's
own gRPC inference and management), the connections stay open across ``stop()``, every port then holds a
connection in TIME-WAIT (the test leaves one where the stop did not), and ``start()`` follows at once on the same ports: it must succeed, and the restarted server answers right (the in-process model).
That a port something really listens on is still refused: tests/serve/test_server_control.py.
"""
from __future__ import annotations

import socket
import time

import grpc
import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as tritongrpc

from servers import READY_TIMEOUT_S

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROWS = np.array([[1.0, -0.5], [-1.0, 0.5]], dtype=np.float32)


def traffic_on_every_port(server, reference) -> list:
    """One answered call on each of ``server``'s ports; returns the open clients (their connections stay up)."""
    keys = server.keys()
    expected = reference.outputs("mlp", ROWS)
    session = requests.Session()  # keep-alive: one connection per address
    answer = session.post(f"{server.inference_url}/predictions/mlp", json={"data": ROWS.tolist()},
                          headers={"Authorization": f"Bearer {keys['inference']}"}, timeout=30)
    assert answer.status_code == 200 and np.allclose(answer.json()["probabilities"], expected, atol=1e-5)
    assert session.get(f"{server.management_url}/models", timeout=30,
                       headers={"Authorization": f"Bearer {keys['management']}"}).status_code == 200
    assert session.get(server.metrics_url, timeout=30).status_code == 200

    oip = tritongrpc.InferenceServerClient(url=server.grpc_address)
    x = tritongrpc.InferInput("input", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS)
    result = oip.infer("mlp", [x], headers={"authorization": f"Bearer {keys['inference']}"})
    assert np.allclose(result.as_numpy("probabilities").reshape(-1), expected, atol=1e-5)

    channels = []
    for port, method in ((server.ports.grpc_inference, "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping"),
                         (server.ports.grpc_management,
                          "/org.pytorch.serve.grpc.management.ManagementAPIsService/ListModels")):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:  # any answer will do (an auth error included): the HTTP/2 connection is what counts
            channel.unary_unary(method)(b"", timeout=30)
        except grpc.RpcError as err:
            assert err.code() != grpc.StatusCode.UNAVAILABLE, err
        channels.append(channel)
    return [session, oip, *channels]


def ports_in_time_wait(ports) -> set[int]:
    """Which of ``ports`` (local side) have a TCP connection in TIME-WAIT."""
    return {c.laddr.port for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_TIME_WAIT and c.laddr and c.laddr.port in ports}


def leave_time_wait(port: int) -> None:
    """Leave a connection in TIME-WAIT on ``port``, as a server that closed it first and stopped does."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first
            assert client.recv(1) == b""


def test_stop_then_start_at_once_after_traffic_on_every_port(start_server, reference):
    server = start_server("restart")
    listening = server.ports.listening()
    clients = traffic_on_every_port(server, reference)
    server.stop()
    for client in clients:
        client.close()
    # Which ports the stop left in TIME-WAIT is a race (who closed first; the drain closes REST connections
    # with a FIN, serve/torchserve/java/Drain.java): the others get one here, so every port
    # is held by TIME-WAIT when start() checks them.
    left = ports_in_time_wait(set(listening.values()))
    print(f"\nafter stop, TIME-WAIT on: {sorted(name for name, port in listening.items() if port in left)}")
    for port in set(listening.values()) - left:
        leave_time_wait(port)
    assert ports_in_time_wait(set(listening.values())) == set(listening.values())

    started = time.monotonic()
    server.start()  # at once: no "port(s) already in use"
    server.wait_ready(timeout=READY_TIMEOUT_S, progress=False)
    print(f"restarted and READY in {time.monotonic() - started:.1f} s")
    for client in traffic_on_every_port(server, reference):
        client.close()
    server.stop()
