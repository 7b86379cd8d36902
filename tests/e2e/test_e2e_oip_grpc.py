"""The OIP gRPC service inside TorchServe's JVM (serve/torchserve/java/OipGrpc.java, InferJob.java) against the
session's real server, with the STOCK client's generated stubs (tritonclient.grpc ``service_pb2``): what
test_e2e_oip.py does not already cover. Typed ``contents`` equal raw inputs and the in-process model; every
malformed request is INVALID_ARGUMENT naming its input before anything is queued; token auth on every RPC
with the inference key only; the message size cap; request IDs when none is given; RPCs outside the
service are UNIMPLEMENTED; statistics count gRPC requests; calls sent before a stop are answered (drain).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc as grpclib
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from e2e_support import TOLERANCE
from models.registry import REGISTRY, get_spec
from servers import start_ready_server

pytestmark = pytest.mark.e2e
MODEL = "mnistnet"


@pytest.fixture(scope="module")
def stub(server):
    channel = grpclib.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture
def meta(server):
    return (("authorization", f"Bearer {server.keys()['inference']}"),)


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def probabilities(reference, x: np.ndarray) -> np.ndarray:
    mean, std = get_spec(MODEL).normalize
    return reference(MODEL, ((x - np.float32(mean)) / np.float32(std)).astype(np.float32))


def raw_request(x: np.ndarray, model: str = MODEL, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def output(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            dtype = {"FP32": "<f4", "INT64": "<i8"}[tensor.datatype]
            return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(tensor.shape)
    raise AssertionError(f"no output {name} in {[t.name for t in response.outputs]}")


def code_and_message(call) -> tuple[grpclib.StatusCode, str]:
    with pytest.raises(grpclib.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_raw_and_typed_contents_answer_the_in_process_model(stub, meta, reference):
    x = digits(5)
    raw = stub.ModelInfer(raw_request(x), metadata=meta, timeout=30)
    typed = pb.ModelInferRequest(model_name=MODEL)
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=[5, 784])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    answer = stub.ModelInfer(typed, metadata=meta, timeout=30)
    want = probabilities(reference, x)
    for response in (raw, answer):
        assert response.model_name == MODEL and response.model_version == "1.0"
        assert [t.name for t in response.outputs] == ["probabilities", "predicted_class"]
        np.testing.assert_allclose(output(response, "probabilities"), want, atol=TOLERANCE)
        assert output(response, "predicted_class").tolist() == want.argmax(axis=1).tolist()


def test_requested_outputs_in_order_and_explicit_version(stub, meta):
    request = raw_request(digits(2), model_version="1.0")
    request.outputs.add(name="predicted_class")
    response = stub.ModelInfer(request, metadata=meta, timeout=30)
    assert [t.name for t in response.outputs] == ["predicted_class"] and response.model_version == "1.0"
    assert len(response.raw_output_contents) == 1 and len(response.raw_output_contents[0]) == 2 * 8


def bad_requests():
    x = digits(1)
    short = raw_request(x)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    both = raw_request(x)
    both.inputs[0].contents.fp32_contents.extend([0.0] * 784)
    extra = raw_request(x)
    extra.raw_input_contents.append(b"1234")
    wrong_field = pb.ModelInferRequest(model_name=MODEL)
    wrong_field.inputs.add(name="input", datatype="FP32", shape=[1, 2]).contents.int64_contents.extend([1, 2])
    too_few = pb.ModelInferRequest(model_name=MODEL)
    too_few.inputs.add(name="input", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1.0, 2.0])
    no_data = pb.ModelInferRequest(model_name=MODEL)
    no_data.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    unknown_type = raw_request(x)
    unknown_type.inputs[0].datatype = "FLOAT"
    duplicate = raw_request(x)
    duplicate.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    duplicate.raw_input_contents.append(x.tobytes())
    out_of_range = pb.ModelInferRequest(model_name=MODEL)
    out_of_range.inputs.add(name="input", datatype="UINT8", shape=[1, 1]).contents.uint_contents.extend([300])
    wrong_shape = raw_request(np.zeros((1, 3), np.float32))  # well formed: the handler refuses it (400)
    return {
        "raw size": (short, ["input", "3132 bytes", "3136"]),
        "raw and typed": (both, ["input", "both"]),
        "raw count": (extra, ["2 raw_input_contents for 1 inputs"]),
        "wrong field": (wrong_field, ["fp32_contents", "int64_contents"]),
        "typed count": (too_few, ["2 values", "needs 3"]),
        "no data": (no_data, ["no data", "fp32_contents"]),
        "datatype": (unknown_type, ["FLOAT"]),
        "duplicate": (duplicate, ["more than once"]),
        "range": (out_of_range, ["out of range", "UINT8"]),
        "no inputs": (pb.ModelInferRequest(model_name=MODEL), ["no inputs"]),
        "handler": (wrong_shape, ["input"]),
    }


@pytest.mark.parametrize("case", list(bad_requests()))
def test_malformed_requests_are_invalid_argument_naming_the_problem(stub, meta, case):
    request, words = bad_requests()[case]
    code, message = code_and_message(lambda: stub.ModelInfer(request, metadata=meta, timeout=30))
    assert code == grpclib.StatusCode.INVALID_ARGUMENT, (code, message)
    for word in words:
        assert word in message, message


def test_unknown_model_and_version_are_not_found_naming_what_is_served(stub, meta):
    code, message = code_and_message(lambda: stub.ModelInfer(raw_request(digits(1), "nosuch"), metadata=meta, timeout=30))
    assert code == grpclib.StatusCode.NOT_FOUND and "nosuch" in message and MODEL in message
    code, message = code_and_message(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="9.9"),
                                                               metadata=meta, timeout=30))
    assert code == grpclib.StatusCode.NOT_FOUND and "9.9" in message and "1.0" in message
    code, _ = code_and_message(lambda: stub.ModelReady(pb.ModelReadyRequest(name=""), metadata=meta, timeout=30))
    assert code == grpclib.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("key", ["none", "wrong", "management"])
def test_every_rpc_needs_the_inference_key(server, stub, key):
    metadata = {"none": (), "wrong": (("authorization", "Bearer wrong"),),
                "management": (("authorization", f"Bearer {server.keys()['management']}"),)}[key]
    calls = [
        lambda: stub.ServerLive(pb.ServerLiveRequest(), metadata=metadata, timeout=10),
        lambda: stub.ModelReady(pb.ModelReadyRequest(name=MODEL), metadata=metadata, timeout=10),
        lambda: stub.ModelInfer(raw_request(digits(1)), metadata=metadata, timeout=10),
        lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), metadata=metadata, timeout=10),
    ]
    for call in calls:
        code, message = code_and_message(call)
        assert code == grpclib.StatusCode.UNAUTHENTICATED and "key" in message, (code, message)


def test_health_metadata_and_statistics_answers(stub, meta):
    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=meta, timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), metadata=meta, timeout=10).ready
    server_meta = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=meta, timeout=10)
    assert server_meta.name == "torchserve" and "binary_tensor_data" in server_meta.extensions
    model_meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=meta, timeout=10)
    assert model_meta.versions == ["1.0"] and model_meta.inputs[0].name == "input"
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL, version="1.0"), metadata=meta, timeout=10)
    for _ in range(3):
        stub.ModelInfer(raw_request(digits(1), model_version="1.0"), metadata=meta, timeout=30)
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL, version="1.0"), metadata=meta, timeout=10)
    assert [s.name for s in after.model_stats] == [MODEL] and after.model_stats[0].version == "1.0"
    assert after.model_stats[0].inference_count - before.model_stats[0].inference_count == 3
    every = stub.ModelStatistics(pb.ModelStatisticsRequest(), metadata=meta, timeout=10)
    assert {s.name for s in every.model_stats} == set(REGISTRY)


def test_request_ids_without_one_given(stub, meta):
    response, call = stub.ModelInfer.with_call(raw_request(digits(1)), metadata=meta, timeout=30)
    trailing = dict(call.trailing_metadata())
    assert response.id == "" and len(trailing["x-request-id"]) == 36  # TorchServe-style UUID, caller gave none
    response, call = stub.ModelInfer.with_call(raw_request(digits(1), id="body-3"), metadata=meta, timeout=30)
    assert response.id == "body-3" and ("x-request-id", "body-3") in call.trailing_metadata()


def test_messages_above_max_request_size_are_refused_and_large_ones_pass(stub, meta, reference):
    x = digits(1024)  # 3.2 MB
    response = stub.ModelInfer(raw_request(x), metadata=meta, timeout=60)
    assert output(response, "predicted_class").tolist() == probabilities(reference, x).argmax(axis=1).tolist()
    huge = raw_request(np.zeros((11_000, 784), np.float32))  # 34.5 MB > max_request_size 32 MiB
    code, message = code_and_message(lambda: stub.ModelInfer(huge, metadata=meta, timeout=60))
    assert code == grpclib.StatusCode.RESOURCE_EXHAUSTED and "max_request_size" in message, (code, message)
    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=meta, timeout=10).live


def test_rpcs_outside_the_service_are_unimplemented(stub, meta):
    code, _ = code_and_message(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=meta, timeout=10))
    assert code == grpclib.StatusCode.UNIMPLEMENTED


def test_concurrent_calls_each_get_their_own_answer(stub, meta, reference):
    inputs = [digits(1 + i % 4, seed=i) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda x: stub.ModelInfer(raw_request(x), metadata=meta, timeout=60), inputs))
    for x, response in zip(inputs, answers):
        np.testing.assert_allclose(output(response, "probabilities"), probabilities(reference, x), atol=TOLERANCE)


def test_calls_sent_before_a_stop_are_answered(tmp_path, server):
    """A server of its own: 16 callers in a loop; the stop lets calls in progress finish (Drain, OipGrpc.drain),
    so every call ends OK or is refused as UNAVAILABLE (never cancelled or reset mid-call)."""
    own = start_ready_server(tmp_path, server.model_store, models=[MODEL])
    channel = grpclib.insecure_channel(own.grpc_address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    metadata = (("authorization", f"Bearer {own.keys()['inference']}"),)
    codes: list = []
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            try:
                stub.ModelInfer(raw_request(digits(8)), metadata=metadata, timeout=30)
                codes.append(grpclib.StatusCode.OK)
            except grpclib.RpcError as exc:
                codes.append(exc.code())
                time.sleep(0.05)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2)
        answered = len(codes)
        own.stop()
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        channel.close()
        own.stop()
    assert answered > 16 and codes.count(grpclib.StatusCode.OK) >= answered
    assert set(codes) <= {grpclib.StatusCode.OK, grpclib.StatusCode.UNAVAILABLE}, set(codes)
