"""Served cost of the handlers' model-quality metrics: mnistnet alone, metrics declared (serve/metrics.yaml,
what `serve start` passes) vs off (TorchServe's default metrics YAML); wrk, 16 connections, JSON and PNG,
two alternating rounds. Run from the repository root: `.venv/bin/python bench/metrics_served.py` (~2 min)."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ts  # noqa: E402
from bench import payloads  # noqa: E402
from bench.loadgen import run_wrk  # noqa: E402
from serve.package import package_models  # noqa: E402
from serve.server import DEFAULT_CONFIG, Ports, Server, load_properties, write_properties  # noqa: E402

root = Path(tempfile.mkdtemp(prefix="ab-"))
store = root / "store"
package_models(["mnistnet"], Path(__file__).resolve().parents[1] / "weights", store)
off_cfg = root / "off.properties"
props = load_properties(DEFAULT_CONFIG)
props["metrics_config"] = str(Path(ts.__file__).parent / "configs" / "metrics.yaml")
write_properties(props, off_cfg, "metrics off: TorchServe's default metrics YAML")
forms = {"json": ("/predictions/mnistnet", *payloads.json_images(1)), "png": ("/predictions/mnistnet", *payloads.png_image())}
results = {}
for rnd in range(2):
    for label, cfg in (("on", DEFAULT_CONFIG), ("off", off_cfg)):
        d = root / f"{label}{rnd}"
        s = Server(config=cfg, ports=Ports.free(), tmpdir=d / "tmp", workdir=d / "w", model_store=store, models=["mnistnet"], log_dir=d / "logs")
        s.start(); s.wait_ready(progress=False)
        try:
            key = s.keys()["inference"]
            for name, (path, body, ct) in forms.items():
                run_wrk(s.inference_url + path, body, ct, 16, 2, key)
                r = run_wrk(s.inference_url + path, body, ct, 16, 8, key)
                results.setdefault((label, name), []).append(r["req_per_s"])
                print(label, rnd, name, round(r["req_per_s"]), r["p50_ms"], r["errors"], flush=True)
        finally:
            s.stop()
for name in forms:
    on, off = results[("on", name)], results[("off", name)]
    print(f"{name}: metrics on {on} vs off {off}: ratio {sum(on)/sum(off):.3f}")
