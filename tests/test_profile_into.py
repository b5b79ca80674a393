"""`profile --into CONFIG` (and `profile --launch ... --into CONFIG`) write a config back as `workload --into` and
`estimate --into` do: YAML stays YAML, with a .bak when its comments would be lost; and the tputs written are per GPU
(the solver multiplies them by an instance's GPUs), so a server of several GPUs has its rates divided by them.

Every profile here runs in-process (Click's CliRunner) against one emulator served from a thread of this process,
50x faster than real, with --start-rate = --max-rate 100 and 5 requests per step: the one bucket measured passes at
once, "capped" at exactly 100 req/s (its TPOT is ~1 ms against a 120 ms SLO), so what is written is known exactly and
a profile takes a fraction of a second.
"""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from fake_backend import FakeBackend

from melange_sky.backends import ClusterInfo
from melange_sky.core.config import load_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.engine.emulator import EmulatorServer, prepare

MODEL = "llama-2-7b"
RATE = 100.0  # --start-rate and --max-rate: every bucket measured reads exactly this

CONFIG_YAML = """\
# Our fleet: the comments a rewrite drops are kept in config.yaml.bak
name: demo
workload_distribution:
  - [0.5, 0.125]   # short prompts
  - [0.25, 0.125]
total_request_rate: 10
input_buckets: [1, 20, 40]
output_buckets: [1, 20, 40]
gpu_info:
  A10G:
    cost: 1.01
    tputs:
      - [7, 1]
      - [5, 2]
"""


class _Emulator:
    """The engine model of `MODEL` on an A10G behind its OpenAI-compatible server, on a free port of 127.0.0.1,
    its event loop in a thread of this process."""

    def __init__(self) -> None:
        ready = prepare(MODEL, "A10G", speed=50, port=0)
        self.server = EmulatorServer(ready.emulator, ready.settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="emulator", daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        self.port = urlsplit(self.url).port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(60)
        self.loop.close()


@pytest.fixture(scope="module")
def emulator():
    served = _Emulator()
    yield served
    served.close()


SPEEDY = ["--model", MODEL, "--buckets", "0:0", "--start-rate", str(RATE), "--max-rate", str(RATE),
          "--requests-per-step", "5", "--bisect-steps", "0", "--timeout", "10"]


def _endpoint(emulator: _Emulator, *extra: str) -> list[str]:
    return ["profile", "--endpoint", emulator.url, *SPEEDY, *extra]


def _entry(path: Path, gpu: str) -> dict:
    data = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    return data["gpu_info"][gpu]


def test_into_a_yaml_config_writes_yaml_keeping_its_comments_in_a_bak(emulator, cli, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML)
    run = cli(*_endpoint(emulator, "-q", "--into", str(path), "--gpu", "A10G"))
    assert run.exit_code == 0, run.stderr
    text = path.read_text()
    assert not text.lstrip().startswith("{")  # YAML, not JSON in a .yaml file
    assert yaml.safe_load(text)["gpu_info"]["A10G"] == {"cost": 1.01, "tputs": [[RATE, 1], [5, 2]]}
    assert "  - [5, 2]" in text  # a matrix row per line, as a user writes it
    backup = tmp_path / "config.yaml.bak"
    assert backup.read_text() == CONFIG_YAML
    assert (f"Warning: {path}: rewritten without its comments (PyYAML cannot keep them); the previous file, "
            f"comments and all, is {backup}") in run.stderr
    assert f"Wrote A10G's tputs into {path}\n" in run.stderr  # one GPU: nothing divided, and nothing said of it
    assert load_config(path, price=catalog_pricer()).gpu("A10G").tputs[0][0] == RATE


@pytest.mark.parametrize(("deployment", "entry", "extra", "gpus", "source"), [
    ({"tensor_parallel_size": 2}, {"accelerators": "A10G:4"}, (), 4,
     "config.yaml: gpu_info.A10G.accelerators 'A10G:4'"),
    ({"tensor_parallel_size": 4}, {"accelerators": "A10G:4"}, ("--server-gpus", "8"), 8, "--server-gpus"),
], ids=["the-entry-pin", "the-option-wins"])
def test_a_server_of_several_gpus_is_written_per_gpu_and_the_output_says_so(emulator, cli, tmp_path, deployment,
                                                                             entry, extra, gpus, source):
    data = yaml.safe_load(CONFIG_YAML)
    data["deployment"] = deployment
    data["gpu_info"]["A10G"].update(entry)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    run = cli(*_endpoint(emulator, "-q", "--into", str(path), "--gpu", "A10G", *extra))
    assert run.exit_code == 0, run.stderr
    assert _entry(path, "A10G")["tputs"] == [[RATE / gpus, 1], [5, 2]]  # the kept buckets were per GPU already
    assert (f"Wrote A10G's tputs into {path} (per GPU: the server's rates / {gpus} GPU(s), from "
            f"{source if source == '--server-gpus' else str(tmp_path / source)})") in run.stderr
    # the report's matrix to paste is per GPU too, and says so
    assert f"per GPU (req/s per bucket: the {gpus}-GPU server's above / {gpus}" in run.stdout
    assert f"[{RATE / gpus}, 0.0]" in run.stdout


def test_a_gpu_added_under_tensor_parallelism_gets_the_deployments_gpus_and_their_pin(emulator, cli, tmp_path):
    data = yaml.safe_load(CONFIG_YAML)
    data["deployment"] = {"tensor_parallel_size": 2}
    data["gpu_info"]["A10G"]["accelerators"] = "A10G:4"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    run = cli(*_endpoint(emulator, "-q", "--into", str(path), "--gpu", "A100-80GB"))
    assert run.exit_code == 0, run.stderr
    added = _entry(path, "A100-80GB")
    assert added["accelerators"] == "A100-80GB:2" and added["tputs"] == [[RATE / 2, 0], [0, 0]]
    assert "the server's rates / 2 GPU(s), from " in run.stderr and "deployment.tensor_parallel_size" in run.stderr
    config = load_config(path, price=catalog_pricer())  # valid as written: priced per GPU from a 2-GPU offer
    assert config.gpu("A100-80GB").tputs[0][0] == RATE / 2


def test_server_gpus_that_the_deployments_tensor_parallelism_does_not_divide_is_refused_before_profiling(
        cli, tmp_path):
    data = yaml.safe_load(CONFIG_YAML)
    data["deployment"] = {"tensor_parallel_size": 2}
    data["gpu_info"]["A10G"]["accelerators"] = "A10G:4"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    before = path.read_text()
    # nothing listens at this endpoint: the error comes before any request
    run = cli("profile", "--endpoint", "http://127.0.0.1:9", *SPEEDY, "--into", str(path), "--gpu", "A10G",
              "--server-gpus", "3")
    assert run.exit_code == 2
    assert run.stderr.startswith("Error: --server-gpus 3 is not a multiple of ")
    assert "deployment.tensor_parallel_size (2)" in run.stderr and path.read_text() == before


def test_server_gpus_goes_with_endpoint_not_launch(cli):
    run = cli("profile", "--launch", "A10G", *SPEEDY, "--server-gpus", "2")
    assert run.exit_code == 2 and "--server-gpus go with --endpoint" in run.stderr


class LoopbackFake(FakeBackend):
    """The fake launcher, its replicas reached at 127.0.0.1 (the fake gives other loopback addresses), where this
    module's emulator listens on the deployment's port: a launched replica is that emulator."""

    @staticmethod
    def _info(cluster, record) -> ClusterInfo:
        info = FakeBackend._info(cluster, record)
        if info.endpoint:
            info = ClusterInfo(info.cluster, info.status, endpoint="127.0.0.1:" + info.endpoint.rsplit(":", 1)[1],
                               head_ip="127.0.0.1", cloud=info.cloud, region=info.region)
        return info

    def endpoint(self, cluster: str, port: int) -> str | None:
        found = super().endpoint(cluster, port)
        return None if found is None else f"127.0.0.1:{port}"


def test_launch_into_a_yaml_config_writes_yaml_per_gpu_of_the_replicas_instance(emulator, cli, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MELANGE_SKY_FAKE_STATE", str(tmp_path / "fake.json"))
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML.replace("    cost: 1.01\n", "    cost: 1.01\n    accelerators: A10G:4\n")
                    + f"deployment:\n  tensor_parallel_size: 2\n  port: {emulator.port}\n  secrets: []\n")
    original = path.read_text()
    run = cli("profile", "--launch", "A10G", *SPEEDY, "--config", str(path), "--into", str(path),
              "--backend", f"{__name__}:LoopbackFake", "-q")
    assert run.exit_code == 0, run.stderr + run.stdout
    # a 4-GPU instance (2 data-parallel TP-2 engines behind its server): its rates / 4
    assert _entry(path, "A10G")["tputs"] == [[RATE / 4, 1], [5, 2]]
    assert (tmp_path / "config.yaml.bak").read_text() == original
    assert "rewritten without its comments" in run.stderr
    assert (f"Wrote the tputs of A10G into {path} (per GPU: a replica's rates / its instance's GPUs: A10G's / 4)"
            in run.stderr)
    assert "per GPU (req/s per bucket: the 4-GPU server's above / 4" in run.stdout
    assert FakeBackend(tmp_path / "fake.json").clusters() == {}  # torn down
