"""Request IDs, Server-Timing and the OIP statistics extension against the session's real TorchServe, through
plain HTTP and the STOCK tritonclient (http and grpc): IDs round-trip on every protocol and on errors, the
``traceparent`` trace ID reaches the model log, stage times fit in the client's measured latency, and the
statistics counters move by exactly the requests sent."""
from __future__ import annotations

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

from servers import post

pytestmark = pytest.mark.e2e
TRACE = "0af7651916cd43dd8448eb211c80319c"
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
        generated = [post(server, path, json=body).headers["X-Request-ID"] for _ in range(2)]
        assert all(generated) and generated[0] != generated[1] and given not in generated


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
    # TorchServe's own errors (here: an unknown model on the native route) name the ID in the header.
    unknown = post(server, "/predictions/nosuch", json={"data": [[1, 2]]}, headers={"X-Request-ID": "ts-err-1"})
    assert unknown.status_code == 404 and unknown.headers["X-Request-ID"] == "ts-err-1"


def test_oip_rest_id_round_trips_through_the_stock_client_and_the_header(server, http, auth):
    x = np.asarray(rows(3), dtype=np.float32)
    tensor = tritonhttp.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = http.infer("mlp", [tensor], request_id="oip-42", headers=auth)
    assert result.get_response()["id"] == "oip-42"
    answer = post(server, "/v2/models/mlp/infer", json=oip_body(rows(3), "body-id-7"))
    assert answer.json()["id"] == "body-id-7" and answer.headers["X-Request-ID"]  # the header: TorchServe's ID
    assert list(timing(answer)) == ["queue", "decode", "infer", "encode"]
    versioned = post(server, "/v2/models/mlp/versions/1.0/infer", json=oip_body(rows(1)),
                     headers={"X-Request-ID": "hdr-1"})
    assert versioned.headers["X-Request-ID"] == "hdr-1" and versioned.json()["id"] == "hdr-1"


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
    (the caller's, else TorchServe's, as in the header) and the traceparent's trace ID; errors too."""
    from serve.package import package_models
    from servers import start_ready_server

    monkeypatch.setenv("SERVE_LOG_LEVEL", "info")
    package_models(["mlp"], weights_dir, tmp_path / "store")
    server = start_ready_server(tmp_path, tmp_path / "store", ["mlp"])
    try:
        traced = post(server, "/predictions/mlp", json={"data": rows(1)},
                      headers={"X-Request-ID": "acc-1", "traceparent": TRACEPARENT})
        unknown = post(server, "/predictions/nosuch", json={"data": rows(1)}, headers={"X-Request-ID": "acc-2"})
        anonymous = post(server, "/v2/models/mlp/infer", json=oip_body(rows(1)))
        assert (traced.status_code, unknown.status_code, anonymous.status_code) == (200, 404, 200)
        assert unknown.headers["X-Request-ID"] == "acc-2"
        wanted = [f'"POST /predictions/mlp HTTP/1.1" 200 ', "request_id=acc-1 trace_id=" + TRACE,
                  '"POST /predictions/nosuch HTTP/1.1" 404 ', "request_id=acc-2",
                  f"request_id={anonymous.headers['X-Request-ID']}"]
        log = server.log_dir / "access_log.log"
        deadline = time.monotonic() + 20
        while not all(w in (text := log.read_text(errors="replace")) for w in wanted) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(w in text for w in wanted), text[-2000:]
    finally:
        server.stop()
