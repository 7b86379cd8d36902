"""serve/server.py and config.properties without starting TorchServe: config derivation, the checks
``Server.start`` makes before launching anything, and key-file parsing."""
from __future__ import annotations

import json
import re
import socket

import pytest

from paths import REPO_ROOT
from serve.server import (
    DEFAULT_CONFIG,
    Ports,
    Server,
    ServerError,
    check_java,
    check_torchserve,
    effective_config,
    java_major_version,
    load_properties,
    port_is_free,
    read_keys,
    write_properties,
)


def java_unescape(value: str) -> str:
    """What java.util.Properties makes of a value's backslash escapes (enough for our regexes)."""
    return re.sub(r"\\(.)", r"\1", value)


@pytest.fixture(scope="module")
def props() -> dict[str, str]:
    return load_properties(DEFAULT_CONFIG)


def test_repository_config_is_locked_down(props):
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"  # no registering models at runtime
    assert props.get("disable_token_authorization", "false") == "false"  # token auth stays on
    assert props["metrics_mode"] == "prometheus"
    assert props["install_py_dep_per_model"] == "false"
    # Room for the largest legitimate request: 1024 MNIST images as full-precision JSON (~16-21 MB).
    assert int(props["max_request_size"]) >= 24 * 1024 * 1024


def test_ports_from_repository_config(props):
    assert Ports.from_properties(props) == Ports(8080, 8081, 8082, 7072, 7071, 9000, oip_grpc=7070)


def test_free_ports_are_distinct_and_bindable():
    ports = Ports.free()
    listening = list(ports.listening().values())
    assert len(set(listening + [ports.worker])) == 7
    for port in listening:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_effective_config_moves_ports_and_store_and_keeps_the_rest(props, tmp_path):
    ports = Ports(18080, 18081, 18082, 17070, 17071, 19000)
    derived = effective_config(props, ports, tmp_path / "store")
    assert derived["inference_address"] == "http://127.0.0.1:18080"
    assert derived["management_address"] == "http://127.0.0.1:18081"
    assert derived["metrics_address"] == "http://127.0.0.1:18082"
    assert (derived["grpc_inference_port"], derived["grpc_management_port"]) == ("17070", "17071")
    assert derived["initial_worker_port"] == "19000"
    assert derived["model_store"] == str(tmp_path / "store")
    for key in ("enable_model_api", "metrics_mode", "max_request_size", "job_queue_size", "vmargs"):
        assert derived[key] == props[key]
    # allowed_urls (a Java regex after properties unescaping) admits only archives of this store.
    allowed = re.compile(java_unescape(derived["allowed_urls"]))
    assert allowed.fullmatch(f"file://{tmp_path}/store/mnistnet.mar")
    assert not allowed.fullmatch(f"file://{tmp_path}/store/sub/mnistnet.mar")
    assert not allowed.fullmatch("file:///etc/evil.mar")
    assert not allowed.fullmatch("https://example.com/mnistnet.mar")

    path = tmp_path / "ts.properties"
    write_properties(derived, path, "header line")
    assert load_properties(path) == derived


def test_repository_allowed_urls_admit_only_the_model_store(props):
    allowed = re.compile(java_unescape(props["allowed_urls"]))
    assert allowed.fullmatch(f"file://{REPO_ROOT}/model_store/mnistnet.mar")
    assert not allowed.fullmatch("http://example.com/model_store/x.mar")


def make_server(tmp_path, models=("linearregression",), ports=None) -> Server:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return Server(ports=ports or Ports.free(), workdir=tmp_path / "work", model_store=store,
                  log_dir=tmp_path / "logs", models=list(models))


def test_start_refuses_missing_archives_naming_them(tmp_path):
    server = make_server(tmp_path, models=("mnistnet", "mlp"))
    (server.model_store / "mlp.mar").write_bytes(b"")
    with pytest.raises(ServerError, match=r"no archive for mnistnet in .*python -m serve.package --models mnistnet"):
        server.start()
    assert not server.is_running()


def test_start_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = Ports.free()
        server = make_server(tmp_path, ports=Ports(free.inference, port, free.metrics, free.grpc_inference,
                                                   free.grpc_management, free.worker, free.oip_grpc))
        (server.model_store / "linearregression.mar").write_bytes(b"")
        with pytest.raises(ServerError, match=rf"{port} \(management\)"):
            server.start()


def time_wait_on_a_port() -> int:
    """A loopback port whose only socket is a connection in TIME-WAIT on the server side: a listener
    accepted a connection, closed it first, the client closed too, and the listener is gone."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    listener.close()
    accepted.close()  # the server side closes first: it is the one left in TIME-WAIT
    assert client.recv(1) == b""
    client.close()
    return port


def test_a_port_held_only_by_time_wait_is_free_and_a_listener_is_not():
    port = time_wait_on_a_port()
    with socket.socket() as plain:  # proof of the TIME-WAIT: a bind without SO_REUSEADDR is refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert port_is_free(port)
    for reuse in (0, 1):  # a real listener, whether or not it set SO_REUSEADDR itself
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            assert not port_is_free(listener.getsockname()[1])


def test_start_refuses_a_tmpdir_too_long_for_unix_sockets(tmp_path):
    server = make_server(tmp_path)
    (server.model_store / "linearregression.mar").write_bytes(b"")
    server.tmpdir = tmp_path / ("t" * 120)
    with pytest.raises(ServerError, match="too long for unix socket"):
        server.start()


def test_stop_when_not_running_says_so(tmp_path):
    assert make_server(tmp_path).stop() is False


def test_read_keys_from_torchserve_key_file(tmp_path):
    assert read_keys(tmp_path) == {}
    (tmp_path / "key_file.json").write_text(json.dumps({
        "management": {"key": "m-key", "expiration time": "2030-01-01T00:00:00Z"},
        "inference": {"key": "i-key", "expiration time": "2030-01-01T00:00:00Z"},
        "API": {"key": "a-key"},
    }))
    assert read_keys(tmp_path) == {"inference": "i-key", "management": "m-key", "api": "a-key"}


def fake_java(directory, version_line: str):
    """An executable ``java`` that prints ``version_line`` to stderr like ``java -version`` does."""
    directory.mkdir(parents=True, exist_ok=True)
    java = directory / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return java


@pytest.mark.parametrize(
    "line, major",
    [('openjdk version "17.0.15" 2025-04-15', 17), ('java version "1.8.0_412"', 8), ('openjdk version "21" 2023-09-19', 21)],
)
def test_java_major_version(tmp_path, line, major):
    assert java_major_version(str(fake_java(tmp_path, line))) == major


def test_old_or_missing_java_is_refused_with_install_help(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServerError, match="(?s)java was not found on PATH.*openjdk-17-jre-headless"):
        check_java()
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk8"))
    fake_java(tmp_path / "jdk8" / "bin", 'java version "1.8.0_412"')
    with pytest.raises(ServerError, match="is Java 8; TorchServe needs Java 11"):
        check_java()


def test_start_refuses_another_torchserve_saying_why():
    """The version guard through its real function: 0.12.0 passes (the installed one too), others refuse."""
    check_torchserve("0.12.0")
    check_torchserve()
    for other in ("0.11.1", "0.13.0", ""):
        with pytest.raises(ServerError, match=r"written for TorchServe 0\.12\.0 only; install it with "
                                               r"`pip install torchserve==0\.12\.0`"):
            check_torchserve(other)


def test_image_models_count_a_versioned_archive_as_a_version_of_its_model(tmp_path):
    """With load_models=all TorchServe names each model after its archive's manifest: mnistnet.mar and a
    `serve.package --version 2.0` archive are two versions of one model, so the image waits for one name."""
    import zipfile
    from types import SimpleNamespace

    from serve.__main__ import image_models

    for file, version in (("mlp.mar", "1.0"), ("mlp-v2.0.mar", "2.0")):
        with zipfile.ZipFile(tmp_path / file, "w") as archive:
            archive.writestr("MAR-INF/MANIFEST.json", json.dumps(
                {"runtime": "python", "model": {"modelName": "mlp", "modelVersion": version, "handler": "handler.py"}}))
    server = SimpleNamespace(base_props={"load_models": "all"}, model_store=tmp_path)
    assert image_models(server, []) == ["mlp"]


def test_start_serves_the_recorded_default_and_says_when_it_cannot(tmp_path, capsys):
    """`serve rollout|rollback` record the default in <store>/.rollout/defaults.json; `start` loads that archive
    as the model's default (host, and --image with load_models=all), or <name>.mar when it is gone (saying so)."""
    from serve.server import ServerError, default_archive, defaults_file, write_defaults

    store = tmp_path / "store"
    store.mkdir()
    assert default_archive(store, "mnistnet") == "mnistnet.mar"  # no record
    write_defaults(store, {"mnistnet": {"default": "2.0", "archive": "mnistnet-v2.0.mar", "history": ["1.0", "2.0"]}})
    assert json.loads(defaults_file(store).read_text())["models"]["mnistnet"]["default"] == "2.0"
    assert [p.name for p in defaults_file(store).parent.iterdir()] == ["defaults.json"]  # no staged file left
    assert default_archive(store, "mnistnet") == "mnistnet.mar"
    assert "mnistnet-v2.0.mar is not in the store; serving mnistnet.mar" in capsys.readouterr().err
    (store / "mnistnet-v2.0.mar").write_bytes(b"")
    assert default_archive(store, "mnistnet") == "mnistnet-v2.0.mar"
    assert default_archive(store, "mlp") == "mlp.mar"

    host = Server(ports=Ports.free(), workdir=tmp_path / "work", model_store=store, models=["mnistnet", "mlp"])
    assert host._models_flag() == ["--models", "mnistnet=mnistnet-v2.0.mar", "mlp=mlp.mar"]
    image = Server(ports=Ports.free(), workdir=tmp_path / "work", model_store=store, models=["mnistnet"], image=True)
    assert image._models_flag() == ["--models", "mnistnet=mnistnet-v2.0.mar"]  # the image's load_models=all
    kserve = Server(ports=Ports.free(), workdir=tmp_path / "work", model_store=store, models=["mnistnet"], image=True,
                    torchserve_args=["--models", "mnistnet=mnistnet.mar"])
    assert kserve._models_flag() == []  # its own --models (or model_snapshot) stays TorchServe's to read

    defaults_file(store).write_text("{not json")
    with pytest.raises(ServerError, match=r"defaults.json cannot be read .*fix or delete it"):
        default_archive(store, "mnistnet")
