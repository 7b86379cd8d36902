"""Request IDs, Server-Timing and the OIP statistics extension against the session's real TorchServe, through
plain HTTP and the STOCK tritonclient (http and grpc): IDs round-trip on every protocol and on errors, the
``traceparent`` trace ID reaches the model log, stage times fit in the client's measured latency, and the
statistics counters move by exactly the requests sent."""
from __future__ import annotations

import json
import time
import uuid

import grpc as grpclib
import numpy as np
import pytest
import requests
import tritonclient.grpc as tritongrpc
import tritonclient.http as tritonhttp
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from paths import REPO_ROOT
from servers import manage, post

pytestmark = pytest.mark.e2e
TRACE = "0af7651916cd43dd8448eb211c80319c"
REPO_CONFIG = REPO_ROOT / "config.properties"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01"


@pytest.fixture
def auth(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


def oip_body(rows: list, request_id: str | None = None, width: int = 2) -> dict:
    body = {"inputs": [{"name": "input", "shape": [len(rows), width], "datatype": "FP32",
                        "data": np.ravel(rows).tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    return body


def timing(response) -> dict[str, float]:
    """``Server-Timing``'s stages in ms."""
    parts = [part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(",")]
    return {name: float(ms) for name, ms in parts}


def rows(n: int, width: int = 2) -> list:  # mlp takes 2 numbers per row
    return np.random.default_rng(n).normal(size=(n, width)).round(3).tolist()


# ------------------------------------------------------------------------------------- request IDs


def test_native_and_kserve_v1_answers_carry_the_callers_or_a_generated_id(server):
    given = f"caller-{uuid.uuid4()}"
    for path, body in [("/predictions/mlp", {"data": rows(2)}), ("/v1/models/mlp:predict", {"instances": rows(2)})]:
        started = time.perf_counter()
        answer = post(server, path, json=body, headers={"X-Request-ID": given})
        latency_ms = (time.perf_counter() - started) * 1000
        assert answer.status_code == 200 and answer.headers["X-Request-ID"] == given, path
        stages = timing(answer)
        assert list(stages) == ["queue", "decode", "infer", "encode"] and all(v >= 0 for v in stages.values())
        assert sum(stages.values()) <= latency_ms
        sent_ms = time.time() * 1000
        generated = [post(server, path, json=body).headers["X-Request-ID"] for _ in range(2)]
        answered_ms = time.time() * 1000
        assert all(generated) and generated[0] != generated[1] and given not in generated
        # A generated ID is a UUID version 7 (RFC 9562) made when the frontend received the request.
        for made in map(uuid.UUID, generated):
            assert made.version == 7 and made.variant == uuid.RFC_4122, made
            assert sent_ms - 1 <= made.int >> 80 <= answered_ms + 1, (made, sent_ms, answered_ms)


def test_errors_name_their_request_id_in_body_and_header(server, auth):
    for path, body in [("/predictions/mlp", {"data": [[1.0, 2.0, 3.0]]}), ("/v1/models/mlp:predict", {"instances": []}),
                       ("/v2/models/mlp/infer", oip_body([[1.0] * 3], width=3)),
                       ("/v2/models/mlp/versions/1.0/infer", oip_body([[1.0] * 3], width=3)),
                       ("/v2/models/nosuch/versions/1.0/infer", oip_body(rows(1)))]:
        given = f"err-{uuid.uuid4()}"
        answer = post(server, path, json=body, headers={"X-Request-ID": given})
        assert answer.status_code in (400, 404), path
        assert answer.json()["request_id"] == given and answer.headers["X-Request-ID"] == given, path
        anonymous = post(server, path, json=body)
        assert anonymous.json()["request_id"] == anonymous.headers["X-Request-ID"] != "", path
    missing = requests.get(server.inference_url + "/v2/models/nosuch/stats", headers=auth, timeout=30)
    assert missing.status_code == 404 and missing.json()["request_id"] == missing.headers["X-Request-ID"]


def _names_its_id(answer, status: int, given: str | None) -> str:
    """``answer`` is a JSON error ``status`` whose header and body name the same request ID (``given``)."""
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    body = answer.json()
    assert body["code"] == status and body["error"], body
    assert body["request_id"] == answer.headers["X-Request-ID"], (body, dict(answer.headers))
    if given is not None:
        assert body["request_id"] == given
    return body["request_id"]


def raw_http(server, request: bytes) -> tuple[int, dict, dict]:
    """Send ``request`` as it is on a new connection; ``(status, headers, JSON body)`` of the answer."""
    import http.client
    import socket

    with socket.create_connection(("127.0.0.1", server.ports.inference), timeout=30) as sock:
        sock.sendall(request)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, json.loads(answer.read())


def test_torchserves_own_errors_name_the_request_id_in_body_and_header(server):
    """Errors that TorchServe writes, not our handlers: unknown model on every route, a bad or missing
    token, an unknown path, a request it cannot parse, the management API's refusals."""
    cases = [
        ("/predictions/nosuch", {"data": rows(1)}, "inference", 404),
        ("/predictions/mlp/9.9", {"data": rows(1)}, "inference", 404),
        ("/v1/models/nosuch:predict", {"instances": rows(1)}, "inference", 404),
        ("/v2/models/nosuch/infer", oip_body(rows(1)), "inference", 404),
        ("/predictions/mlp", {"data": rows(1)}, "management", 400),  # the wrong key
        ("/predictions/mlp", {"data": rows(1)}, None, 400),  # no key
        ("/no/such/path", {}, "inference", 404),
    ]
    for path, body, key, status in cases:
        given = f"ts-{uuid.uuid4()}"
        _names_its_id(post(server, path, key, json=body, headers={"X-Request-ID": given}), status, given)
        generated = {_names_its_id(post(server, path, key, json=body), status, None) for _ in range(2)}
        assert len(generated) == 2 and all(len(g) == 36 for g in generated), (path, generated)  # fresh UUIDs
    # An unusable X-Request-ID (a space in it) is not used: a fresh ID names the error.
    spaced = post(server, "/predictions/nosuch", json={}, headers={"X-Request-ID": "has space"})
    assert _names_its_id(spaced, 404, None) != "has space"
    # The management API (scaling an unknown model) and a request TorchServe cannot parse.
    _names_its_id(manage(server, "PUT", "/models/nosuch?min_worker=1", headers={"X-Request-ID": "m-1"}), 404, "m-1")
    status, headers, body = raw_http(server, b"BLAH\r\n\r\n")
    assert status == 400 and body["request_id"] == headers["x-request-id"] != ""
    status, headers, body = raw_http(server, b"POST /predictions/mlp HTTP/1.1\r\nHost: x\r\nX-Request-ID: raw-2\r\n"
                                             b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert (status, body["request_id"], headers["x-request-id"]) == (400, "raw-2", "raw-2")  # no token


def test_nettys_own_refusals_of_an_expect_header_name_the_request_id(server):
    """Netty's aggregator answers ``Expect:`` itself, before TorchServe sees the request: 413 for
    ``100-continue`` with a body over max_request_size (the client need not send it), 417 for an
    expectation it does not know. Both get the caller's ID (else a fresh one), a JSON body and the limit."""
    from serve.server import load_properties

    limit = int(load_properties(server.workdir / "ts-config.properties")["max_request_size"])
    head = ("POST /predictions/mlp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: {length}\r\nExpect: {expect}\r\n{more}\r\n")
    status, headers, body = raw_http(server, head.format(length=limit + 1, expect="100-continue",
                                                         more="X-Request-ID: big-1\r\n").encode())
    assert (status, body["code"], body["request_id"], headers["x-request-id"]) == (413, 413, "big-1", "big-1")
    assert f"exceeds max_request_size ({limit} bytes)" in body["message"] == body["error"], body
    status, headers, body = raw_http(server, head.format(length=2, expect="tea", more="").encode())
    assert (status, body["code"]) == (417, 417) and body["request_id"] == headers["x-request-id"] != ""
    assert body["message"] == body["error"] == "Expectation Failed", body


def test_oip_rest_id_round_trips_through_the_stock_client_and_the_header(server, http, auth):
    x = np.asarray(rows(3), dtype=np.float32)
    tensor = tritonhttp.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = http.infer("mlp", [tensor], request_id="oip-42", headers=auth)
    assert result.get_response()["id"] == "oip-42"
    # Without X-Request-ID the body's id is the request ID: the answer's header too.
    answer = post(server, "/v2/models/mlp/infer", json=oip_body(rows(3), "body-id-7"))
    assert answer.json()["id"] == "body-id-7" and answer.headers["X-Request-ID"] == "body-id-7"
    assert list(timing(answer)) == ["queue", "decode", "infer", "encode"]
    versioned = post(server, "/v2/models/mlp/versions/1.0/infer", json=oip_body(rows(1)),
                     headers={"X-Request-ID": "hdr-1"})
    assert versioned.headers["X-Request-ID"] == "hdr-1" and versioned.json()["id"] == "hdr-1"
    both = post(server, "/v2/models/mlp/infer", json=oip_body(rows(1), "body-8"), headers={"X-Request-ID": "hdr-8"})
    assert both.headers["X-Request-ID"] == "hdr-8" and both.json()["id"] == "body-8"  # the header names it
    # A refused request with an id names it; an id that is no usable string is itself refused.
    refused = post(server, "/v2/models/mlp/infer", json=oip_body([[1.0] * 3], "body-9", width=3))
    assert _names_its_id(refused, 400, "body-9")
    for bad in (42, "has space", "", "x" * 129, {"a": 1}):
        for path in ("/v2/models/mlp/infer", "/v2/models/mlp/versions/1.0/infer"):
            answer = post(server, path, json=oip_body(rows(1), bad))
            generated = _names_its_id(answer, 400, None)
            assert generated != bad and "'id' must be a string" in answer.json()["error"], (bad, answer.text)
    # The stock client with binary tensors: the id travels in the JSON header of the binary body.
    tensor = tritonhttp.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        http.infer("mlp", [tensor], request_id="bad id", headers=auth)
    assert "'id' must be a string" in err.value.message()


def test_grpc_forwards_the_id_and_returns_it_in_trailing_metadata(server, grpc, auth):
    x = np.asarray(rows(2), dtype=np.float32)
    tensor = tritongrpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = grpc.infer("mlp", [tensor], request_id="grpc-9", headers={"authorization": auth["Authorization"]})
    assert result.get_response().id == "grpc-9"
    channel = grpclib.insecure_channel(server.grpc_address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 2])
    request.raw_input_contents.append(x.tobytes())
    metadata = (("authorization", auth["Authorization"]), ("x-request-id", "meta-5"))
    response, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=30)
    assert response.id == "meta-5" and ("x-request-id", "meta-5") in call.trailing_metadata()
    bad = service_pb2.ModelInferRequest(model_name="mlp")
    bad.inputs.add(name="input", datatype="FP32", shape=[1, 3])
    bad.raw_input_contents.append(np.zeros(3, np.float32).tobytes())
    with pytest.raises(grpclib.RpcError) as err:
        stub.ModelInfer(bad, metadata=(*metadata[:1], ("x-request-id", "meta-bad")), timeout=30)
    assert err.value.code() == grpclib.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "meta-bad") in err.value.trailing_metadata()
    channel.close()


def test_traceparent_trace_id_reaches_the_model_log_lines_of_its_request(server):
    given = f"traced-{uuid.uuid4()}"
    answer = post(server, "/predictions/mlp", json={"data": [[1.0]]},
                  headers={"X-Request-ID": given, "traceparent": TRACEPARENT})
    assert answer.status_code == 400
    log = server.log_dir / "model_log.log"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text(errors="replace").splitlines() if given in line]
        if lines:
            break
        time.sleep(0.2)
    assert lines and all(f"trace_id={TRACE}" in line for line in lines) and "answered 400" in lines[0]


# -------------------------------------------------------------------------------------- statistics


def _stats(http, auth, name, version=""):
    (stats,) = http.get_inference_statistics(name, version, headers=auth)["model_stats"]
    return stats


def _moved(before: dict, after: dict, key: str) -> tuple[int, int]:
    return (after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"],
            after["inference_stats"][key]["ns"] - before["inference_stats"][key]["ns"])


def test_statistics_extension_counts_the_requests_sent(server, http, grpc, auth):
    assert "statistics" in http.get_server_metadata(headers=auth)["extensions"]
    name = "regressionnet"
    before = _stats(http, auth, name)
    good, bad, latency_ns = 5, 3, 0
    for i in range(good + bad):
        body = oip_body(rows(2, 10), width=10) if i < good else oip_body([[1.0] * 3], width=3)
        started = time.perf_counter_ns()
        answer = post(server, f"/v2/models/{name}/infer", json=body)
        latency_ns += time.perf_counter_ns() - started
        assert answer.status_code == (200 if i < good else 400), answer.text
    deadline = time.monotonic() + 20  # the handler's metrics reach the frontend through the model log
    while True:
        after = _stats(http, auth, name)
        if _moved(before, after, "fail")[0] == bad and _moved(before, after, "compute_output")[0] >= 1 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after["name"] == name and after["version"] == "1.0"
    assert after["inference_count"] - before["inference_count"] == good + bad
    assert _moved(before, after, "success")[0] == good and _moved(before, after, "fail")[0] == bad
    assert _moved(before, after, "queue")[0] == good + bad
    assert 1 <= after["execution_count"] - before["execution_count"] <= good + bad
    stages = sum(_moved(before, after, key)[1] for key in ("compute_input", "compute_infer", "compute_output"))
    assert 0 < stages <= latency_ns
    assert 0 < _moved(before, after, "success")[1] + _moved(before, after, "queue")[1] <= 2 * latency_ns
    assert _moved(before, after, "queue")[1] <= latency_ns
    # The same numbers through the versioned route, every model's list, and the stock gRPC client.
    assert _stats(http, auth, name, "1.0")["inference_count"] == after["inference_count"]
    everything = http.get_inference_statistics(headers=auth)["model_stats"]
    assert {s["name"] for s in everything} >= {"mlp", name}
    through_grpc = grpc.get_inference_statistics(name, headers={"authorization": auth["Authorization"]},
                                                 as_json=True)["model_stats"][0]
    assert through_grpc["name"] == name and int(through_grpc["inference_count"]) == after["inference_count"]
    assert int(through_grpc["inference_stats"]["fail"]["count"]) == after["inference_stats"]["fail"]["count"]
    with pytest.raises(InferenceServerException) as err:
        grpc.get_inference_statistics("nosuch", headers={"authorization": auth["Authorization"]})
    assert "nosuch" in err.value.message()


def test_access_log_lines_name_the_request_id_and_trace_id(tmp_path, weights_dir, monkeypatch):
    """With SERVE_LOG_LEVEL=info (the access log's level), each access log line ends with the answer's ID
    (the caller's, else the OIP body's id, else TorchServe's, as in the header) and the traceparent's trace
    ID; errors too, also those TorchServe or Netty write: a body over max_request_size (413, which Netty
    answers before TorchServe sees the request) and a model without workers (503)."""
    from serve.package import package_models
    from servers import start_ready_server

    monkeypatch.setenv("SERVE_LOG_LEVEL", "info")
    package_models(["mlp"], weights_dir, tmp_path / "store")
    config = tmp_path / "config.properties"
    limit = 100_000
    config.write_text(REPO_CONFIG.read_text() + f"\nmax_request_size={limit}\n")  # the last one counts
    server = start_ready_server(tmp_path, tmp_path / "store", ["mlp"], config=config)
    try:
        traced = post(server, "/predictions/mlp", json={"data": rows(1)},
                      headers={"X-Request-ID": "acc-1", "traceparent": TRACEPARENT})
        unknown = post(server, "/predictions/nosuch", json={"data": rows(1)}, headers={"X-Request-ID": "acc-2"})
        anonymous = post(server, "/v2/models/mlp/infer", json=oip_body(rows(1)))
        named = post(server, "/v2/models/mlp/infer", json=oip_body([[1.0] * 3], "acc-3", width=3))
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel := grpclib.insecure_channel(server.grpc_address))
        request = service_pb2.ModelInferRequest(model_name="mlp")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 2])
        request.raw_input_contents.append(np.asarray(rows(1), dtype=np.float32).tobytes())
        stub.ModelInfer(request, metadata=(("authorization", f"Bearer {server.keys()['inference']}"),
                                           ("x-request-id", "acc-6"), ("traceparent", TRACEPARENT)), timeout=30)
        channel.close()
        assert (traced.status_code, unknown.status_code, anonymous.status_code) == (200, 404, 200)
        assert unknown.headers["X-Request-ID"] == "acc-2" and _names_its_id(named, 400, "acc-3")
        big = {"data": rows(limit // 10)}  # ~0.3 MB of JSON
        too_large = _names_its_id(post(server, "/predictions/mlp", json=big, headers={"X-Request-ID": "acc-4"}),
                                  413, "acc-4")
        assert too_large and f"max_request_size ({limit} bytes)" in post(server, "/predictions/mlp", json=big).json()["error"]
        _names_its_id(post(server, "/predictions/mlp", json=big), 413, None)
        # still served on a new connection after the refusals
        assert post(server, "/predictions/mlp", json={"data": rows(1)}).status_code == 200
        scaled = manage(server, "PUT", "/models/mlp?min_worker=0&max_worker=0&synchronous=true")
        assert scaled.status_code == 200, scaled.text
        no_worker = post(server, "/predictions/mlp", json={"data": rows(1)}, headers={"X-Request-ID": "acc-5"})
        _names_its_id(no_worker, 503, "acc-5")
        wanted = ['"POST /predictions/mlp HTTP/1.1" 200 ', "request_id=acc-1 trace_id=" + TRACE,
                  '"POST /predictions/nosuch HTTP/1.1" 404 ', "request_id=acc-2",
                  f"request_id={anonymous.headers['X-Request-ID']}",
                  '"POST /v2/models/mlp/infer HTTP/1.1" 400 ', "request_id=acc-3",
                  '"POST /predictions/mlp HTTP/1.1" 413 ', "request_id=acc-4",
                  '"POST /predictions/mlp HTTP/1.1" 503 ', "request_id=acc-5",
                  '"gRPC /inference.GRPCInferenceService/ModelInfer HTTP/2.0" 0 ', "request_id=acc-6 trace_id=" + TRACE]
        log = server.log_dir / "access_log.log"
        deadline = time.monotonic() + 20
        while not all(w in (text := log.read_text(errors="replace")) for w in wanted) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(w in text for w in wanted), [w for w in wanted if w not in text] + [text[-2000:]]
        for line in text.splitlines():
            if "request_id=acc-" in line:
                code, rid = line.split('" ')[1].split()[0], line.split("request_id=")[1].split()[0]
                assert (code, rid) in {("200", "acc-1"), ("404", "acc-2"), ("400", "acc-3"), ("413", "acc-4"),
                                       ("503", "acc-5"), ("0", "acc-6")}, line  # gRPC: its status code
    finally:
        server.stop()
