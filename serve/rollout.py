"""Model versions on a running server: ``python -m serve rollout|rollback|versions``.

``rollout <model> V`` registers ``model_store/<model>-v<V>.mar`` beside the current default (the registry's
workers), waits for its workers, runs the quality gate through the served path (the held-out split sent to
both versions' ``/v2/models/<m>/versions/<v>/infer`` as binary OIP batches), and only if V is no worse than
the default by more than the margin makes it the default; the old version then answers every request it has
(the agent's count of its queued and held requests, polled until it is 0, at most ``--drain-timeout``) and is
unregistered (its archive stays in the store). A failed gate unregisters V; the default never changes.
``rollback <model>`` brings the previous default back the same way (no gate: it served before).

TorchServe's register/unregister stay off (``enable_model_api=false``); this module reaches them through the
agent's ``/rollout`` endpoint on the loopback management port, with the management key and a per-rollout
secret in ``<workdir>/rollout.secret`` (mode 0600, created exclusively, so it is also the lock that refuses a
second rollout at the same time). docs/security.md, "Rolling out a version", says why that is the narrowest
opening. Each model's default version and the versions it replaced are recorded in the model store
(``<store>/.rollout/defaults.json``, serve/server.py :func:`~serve.server.defaults_file`): the next ``serve
start`` on that store serves the promoted version, and a rollback after a restart goes back one step.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import requests

from serve.server import (Server, ServerError, check_archive, defaults_file, read_defaults, writable_dir,
                          write_defaults)

if TYPE_CHECKING:
    from models.registry import ModelSpec

SECRET_FILE = "rollout.secret"  # must match RolloutEndpoint.SECRET_FILE
DEFAULT_MARGIN = 0.005  # accuracy: absolute drop allowed (0.5 points); MSE: relative rise allowed (0.5 %)
DEFAULT_GATE_SAMPLES = 2000  # the first N held-out samples (0: all of them; MNIST's test set has 10,000)
GATE_BATCH = 250  # samples per gate request
DRAIN_TIMEOUT_S = 30.0  # longest wait for the old version's requests in flight before it is retired anyway
DRAIN_POLL_S = 0.05


class RolloutError(RuntimeError):
    """A rollout or rollback step was refused or failed; the message says which and why. The default version
    is whatever it was before the command, unless the message says otherwise."""


@dataclass
class Rollout:
    """One server's rollout machinery: its management URL, keys and working directory."""

    server: Server
    log: callable = print
    timeout: float = 120.0

    # --- management calls ---
    def _call(self, method: str, path: str, *, params: dict | None = None, timeout: float | None = None) -> dict:
        key = self.server.keys().get("management")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = requests.request(method, self.server.management_url + path, params=params, headers=headers,
                                        timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            raise RolloutError(f"cannot reach TorchServe's management API at {self.server.management_url}: "
                               f"{exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text}
        if not response.ok:
            message = body.get("message") or body.get("error") if isinstance(body, dict) else body
            raise RolloutError(f"{method} {path} answered {response.status_code}: {message}")
        return body

    def versions(self, model: str) -> list[dict]:
        """Every registered version of ``model`` (the management API's description of each)."""
        try:
            return self._call("GET", f"/models/{model}/all")
        except RolloutError as exc:
            if " 404:" in str(exc):
                raise RolloutError(f"model {model!r} is not served by this server") from None
            raise

    def default_version(self, model: str) -> str:
        return self._call("GET", f"/models/{model}")[0]["modelVersion"]

    def _endpoint(self, secret: str, **params) -> dict:
        return self._call("POST", "/rollout", params={**params, "secret": secret})

    # --- the lock and secret ---
    def _acquire(self) -> str:
        """Create the secret file (pid and token, mode 0600) or refuse while another live process holds it.
        Written to a private temporary file first and linked into place (fails if the name exists), so the
        file is never seen without its pid."""
        path = self.server.workdir / SECRET_FILE
        token = secrets.token_urlsafe(32)
        staged = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{os.getpid()} {token}\n")
        try:
            for _ in range(2):
                try:
                    os.link(staged, path)
                    return token
                except FileExistsError:
                    try:
                        pid = int(path.read_text().split()[0])
                    except FileNotFoundError:
                        continue  # released meanwhile
                    except (OSError, ValueError, IndexError):
                        pid = None
                    if pid is not None and psutil.pid_exists(pid):
                        raise RolloutError(f"another rollout or rollback is in progress on this server (pid {pid}); "
                                           "wait for it to finish") from None
                    path.unlink(missing_ok=True)  # left by a rollout that died
            raise RolloutError(f"cannot create {path}")
        finally:
            staged.unlink(missing_ok=True)

    def _release(self) -> None:
        (self.server.workdir / SECRET_FILE).unlink(missing_ok=True)

    # --- the record of defaults (in the model store) ---
    def _history(self, model: str) -> list[str]:
        """The versions ``model`` was served by, oldest first, the current default last (the record's)."""
        try:
            entry = read_defaults(self.server.model_store).get(model) or {}
        except ServerError as exc:
            raise RolloutError(str(exc)) from None
        return [str(v) for v in entry.get("history", [])]

    def _record(self, spec: ModelSpec, history: list[str]) -> None:
        """Record ``spec``'s version as the default of its model, ``history`` ending with it."""
        try:
            models = read_defaults(self.server.model_store)
            models[spec.name] = {"default": spec.version, "archive": f"{spec.artifact_stem}.mar", "history": history}
            write_defaults(self.server.model_store, models)
        except (OSError, ServerError) as exc:
            raise RolloutError(f"cannot record the default in {defaults_file(self.server.model_store)}: {exc}; "
                               f"{spec.name} {spec.version} serves as the default until the server restarts") from None

    def _check_record_writable(self) -> None:
        """Refuse before anything is registered when the record cannot be written (a read-only store)."""
        try:
            writable_dir(defaults_file(self.server.model_store).parent, "model store's record folder",
                         "a rollout records the new default there so that a restart serves it; make it writable (in "
                         "the container: mount a model store the image's user, uid 10001, can write)")
        except ServerError as exc:
            raise RolloutError(str(exc)) from None

    # --- steps ---
    def archive_of(self, spec: ModelSpec) -> Path:
        """The store archive of ``spec``'s version, checked: readable and naming that model and version."""
        path = self.server.model_store / f"{spec.artifact_stem}.mar"
        if not path.is_file():
            raise RolloutError(f"{path} does not exist; build it with `python -m serve.package --models "
                               f"{spec.name} --version {spec.version}`")
        try:
            check_archive(path, spec.name)
            with zipfile.ZipFile(path) as archive:
                manifest = json.loads(archive.read("MAR-INF/MANIFEST.json")).get("model", {})
        except ServerError as exc:
            raise RolloutError(str(exc)) from None
        if (manifest.get("modelName"), manifest.get("modelVersion")) != (spec.name, spec.version):
            raise RolloutError(f"{path} holds {manifest.get('modelName')} version {manifest.get('modelVersion')}, "
                               f"not {spec.name} version {spec.version}")
        return path

    def _register(self, secret: str, spec: ModelSpec, archive: Path) -> float:
        started = time.perf_counter()
        self.log(f"registering {spec.name} {spec.version} from {archive.name} ({spec.workers} workers)")
        self._endpoint(secret, op="register", model=spec.name, version=spec.version, archive=archive.name,
                       workers=str(spec.workers))
        self._wait_ready(spec.name, spec.version, spec.workers)
        return time.perf_counter() - started

    def _wait_ready(self, model: str, version: str, workers: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            description = self._call("GET", f"/models/{model}/{version}")[0]
            ready = sum(w.get("status") == "READY" for w in description.get("workers", []))
            if ready >= workers:
                return
            if time.monotonic() > deadline:
                raise RolloutError(f"{model} {version}: {ready} of {workers} workers READY after {self.timeout:.0f} s")
            time.sleep(0.1)

    def inflight(self, secret: str, model: str, version: str) -> int:
        """Requests that reached ``version`` and are not answered yet: queued, or held by its workers."""
        return int(self._endpoint(secret, op="inflight", model=model, version=version)["inflight"])

    def _retire(self, secret: str, model: str, version: str, drain_timeout: float) -> dict:
        """Wait until ``version`` (no longer the default) has answered every request that reached it (its in-flight
        count read 0 twice in a row), at most ``drain_timeout`` seconds, then unregister it."""
        started = time.monotonic()
        zeros, count, first = 0, None, None
        while zeros < 2:
            count = self.inflight(secret, model, version)
            first = count if first is None else first
            zeros = zeros + 1 if count == 0 else 0
            if zeros < 2:
                if time.monotonic() - started > drain_timeout:
                    self.log(f"{model} {version} still has {count} request(s) in flight after the drain timeout "
                             f"({drain_timeout:g} s, --drain-timeout); retiring it anyway")
                    break
                time.sleep(DRAIN_POLL_S)
        drain_s = time.monotonic() - started
        self._endpoint(secret, op="unregister", model=model, version=version)
        self.log(f"retired {model} {version} after {drain_s:.2f} s of drain (its archive stays in "
                 f"{self.server.model_store})")
        return {"drain_s": round(drain_s, 2), "in_flight_at_drain_start": first, "drained": zeros >= 2,
                "left_in_flight": 0 if zeros >= 2 else count}

    def rollout(self, model: str, version: str, *, margin: float = DEFAULT_MARGIN,
                gate_samples: int = DEFAULT_GATE_SAMPLES, drain_timeout: float = DRAIN_TIMEOUT_S,
                report_path: Path | None = None) -> dict:
        """Register, gate and (if it passes) promote ``model`` ``version``; returns the report."""
        from models.registry import check_version, get_spec  # here: `serve start --image` runs without models/

        try:
            spec = get_spec(model).at_version(check_version(version))
        except (KeyError, ValueError) as exc:
            raise RolloutError(exc.args[0]) from None
        started = time.perf_counter()
        current = self._current(model)
        served = [v["modelVersion"] for v in self.versions(model)]
        if version in served:
            raise RolloutError(f"{model} version {version} is already served (served: {', '.join(served)}; "
                               f"default {current})")
        archive = self.archive_of(spec)
        self._check_record_writable()
        secret = self._acquire()
        try:
            try:
                load_s = self._register(secret, spec, archive)
            except RolloutError:
                self._unregister_quietly(secret, model, version)
                raise
            try:
                report = quality_gate(self.server, spec, current, version, margin, gate_samples)
            except Exception:
                self._unregister_quietly(secret, model, version)
                raise
            report.update(model=model, default=current, load_s=round(load_s, 2))
            if report["passed"]:
                self._call("PUT", f"/models/{model}/{version}/set-default")
                report["promoted_after_s"] = round(time.perf_counter() - started, 2)
                self.log(f"{model} {version} is the default now ({report['promoted_after_s']} s after the start)")
                versions = self._history(model) or [current]
                if versions[-1] != current:  # the record is not this server's (e.g. started with another store)
                    versions = [current]
                self._record(spec, [*versions, version])
                report.update(self._retire(secret, model, current, drain_timeout))
            else:
                self._endpoint(secret, op="unregister", model=model, version=version)
                self.log(f"gate refused {model} {version}: unregistered it; {current} stays the default")
        finally:
            self._release()
        report["seconds"] = round(time.perf_counter() - started, 2)
        self._write_report(report, report_path, f"rollout-{model}-{version}")
        return report

    def rollback(self, model: str, drain_timeout: float = DRAIN_TIMEOUT_S) -> dict:
        """Make the version served before the current default the default again (registered from the store)."""
        from models.registry import get_spec

        try:
            get_spec(model)
        except KeyError as exc:
            raise RolloutError(exc.args[0]) from None
        current = self._current(model)
        versions = self._history(model)
        if len(versions) < 2 or versions[-1] != current:
            raise RolloutError(f"{model} has no previous version to go back to (default {current}; no rollout "
                               f"recorded in {defaults_file(self.server.model_store)} made it the default)")
        previous = versions[-2]
        spec = get_spec(model).at_version(previous)
        archive = self.archive_of(spec)
        self._check_record_writable()
        started = time.perf_counter()
        secret = self._acquire()
        try:
            served = [v["modelVersion"] for v in self.versions(model)]
            if previous not in served:
                try:
                    self._register(secret, spec, archive)
                except RolloutError:
                    self._unregister_quietly(secret, model, previous)
                    raise
            self._call("PUT", f"/models/{model}/{previous}/set-default")
            self._record(spec, versions[:-1])
            self.log(f"{model} {previous} is the default again")
            drain = self._retire(secret, model, current, drain_timeout)
        finally:
            self._release()
        report = {"model": model, "from": current, "to": previous, **drain,
                  "seconds": round(time.perf_counter() - started, 2)}
        self._write_report(report, None, f"rollback-{model}-{previous}")
        return report

    def _current(self, model: str) -> str:
        from models.registry import get_spec

        try:
            get_spec(model)
        except KeyError as exc:
            raise RolloutError(exc.args[0]) from None
        self.versions(model)  # a clear "not served" first
        return self.default_version(model)

    def _unregister_quietly(self, secret: str, model: str, version: str) -> None:
        try:
            self._endpoint(secret, op="unregister", model=model, version=version)
        except RolloutError:
            pass  # it was never registered

    def _write_report(self, report: dict, path: Path | None, stem: str) -> None:
        path = path or self.server.workdir / "rollouts" / f"{stem}-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        report["report_file"] = str(path)


def held_out(spec: ModelSpec, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``: the first ``samples`` of the spec's held-out split (0: all), inputs as the
    served model takes them (MNIST: raw pixels in [0, 1], 784 per image; the handler normalises)."""
    from train.data import load_dataset, mnist_arrays

    if spec.dataset == "mnist":
        images, labels = mnist_arrays("test")
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        y = labels.astype(np.int64)
    else:
        data = load_dataset(spec.dataset)
        x, y = data.x_test.numpy().astype(np.float32), data.y_test.numpy()
    if samples:
        x, y = x[:samples], y[:samples]
    return x.reshape(len(x), *spec.input_shape), y


def served_outputs(server: Server, spec: ModelSpec, version: str, x: np.ndarray) -> np.ndarray:
    """The served answer of ``version`` for every row of ``x`` (predicted class, or the regression value),
    in binary OIP batches to ``/v2/models/<m>/versions/<v>/infer``."""
    from client.api import TorchServeClient, TorchServeError

    output = "predicted_class" if spec.task != "regression" else "predictions"
    client = TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file,
                              timeout=60.0, retries=4)
    answers = []
    try:
        for start in range(0, len(x), GATE_BATCH):
            try:
                response = client.predict_v2(spec.name, x[start:start + GATE_BATCH], version=version, binary=True)
            except TorchServeError as exc:
                raise RolloutError(f"the gate's request to {spec.name} {version} failed: {exc}") from None
            if response.get("model_version") != version:
                raise RolloutError(f"{spec.name} {version}'s route was answered by version "
                                   f"{response.get('model_version')}")
            data = next(o["data"] for o in response["outputs"] if o["name"] == output)
            answers.append(np.asarray(data).reshape(-1))
    finally:
        client.close()
    return np.concatenate(answers)


def quality_gate(server: Server, spec: ModelSpec, current: str, candidate: str, margin: float,
                 samples: int) -> dict:
    """Both versions' metric on the held-out samples through the served path, and whether ``candidate`` passes."""
    x, y = held_out(spec, samples)
    old = served_outputs(server, spec, current, x)
    new = served_outputs(server, spec, candidate, x)
    report: dict = {"version": candidate, "samples": len(x), "margin": margin}
    if spec.task == "regression":
        old_mse, new_mse = float(np.mean((old - y.reshape(-1)) ** 2)), float(np.mean((new - y.reshape(-1)) ** 2))
        report.update(metric="mse", default_metric=old_mse, candidate_metric=new_mse,
                      mean_abs_difference=float(np.mean(np.abs(new - old))),
                      passed=bool(new_mse <= old_mse * (1 + margin)),
                      rule=f"candidate MSE <= default MSE x (1 + {margin})")
        return report
    y = y.reshape(-1).astype(np.int64)
    old, new = old.astype(np.int64), new.astype(np.int64)
    old_acc, new_acc = float(np.mean(old == y)), float(np.mean(new == y))
    report.update(metric="accuracy", default_metric=old_acc, candidate_metric=new_acc,
                  agreement=float(np.mean(old == new)), passed=bool(new_acc >= old_acc - margin),
                  rule=f"candidate accuracy >= default accuracy - {margin}")
    if spec.num_classes:
        report["per_class"] = {
            str(c): {"n": int(np.sum(y == c)),
                     "default": float(np.mean(old[y == c] == c)) if np.any(y == c) else None,
                     "candidate": float(np.mean(new[y == c] == c)) if np.any(y == c) else None}
            for c in range(spec.num_classes)
        }
        for row in report["per_class"].values():
            row["change"] = None if row["default"] is None else round(row["candidate"] - row["default"], 4)
    return report


def describe_versions(rollout: Rollout, models: list[str]) -> list[str]:
    """One line per served version: workers READY/total, pending requests, which is the default."""
    lines = []
    for model in models:
        default = rollout.default_version(model)
        for description in rollout.versions(model):
            workers = description.get("workers", [])
            ready = sum(w.get("status") == "READY" for w in workers)
            version = description["modelVersion"]
            lines.append(f"  {model} {version}{' (default)' if version == default else ''}: {ready}/{len(workers)} "
                         f"workers READY, {description.get('jobQueueStatus', {}).get('pendingRequests', 0)} pending "
                         f"({description.get('modelUrl')})")
    return lines


def print_report(report: dict, out=sys.stdout) -> None:
    print(json.dumps(report, indent=1), file=out, flush=True)


__all__ = ["Rollout", "RolloutError", "quality_gate", "held_out", "describe_versions"]
