"""The whole mesh as child processes: redis-server (unless a URL is given), then auth, asr,
mt and gateway, each on its own port, wired together. Used by `make run`, the end-to-end and
fault-injection tests, the benchmarks and the load generator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.testing import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("auth", "asr", "mt", "gateway")
DEFAULT_PORTS = {
    "gateway": (50050, 9150),
    "asr": (50051, 9151),
    "mt": (50052, 9152),
    "auth": (50053, 9153),
}


@dataclass
class ServiceProcess:
    name: str
    port: int
    metrics_port: int
    env: dict[str, str]
    log: IO[bytes] | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def metric(self, prefix: str) -> float:
        """The sum of the Prometheus samples whose line starts with `prefix`."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        total = 0.0
        for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
            if line.startswith(prefix):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log else None,
        )

    def wait_started(self, timeout_s: float) -> None:
        """Waits for the overall health "" to say SERVING (start-up finished)."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process and self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
                try:
                    status = health.Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1
                    ).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not start within {timeout_s:.0f}s")

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 30) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Say so loudly, but never leave a child behind: a stuck shutdown is a bug
                # to chase, not a reason to leak a process.
                print(
                    f"{self.name} ignored signal {sig} for {timeout_s:.0f}s; killing it",
                    file=sys.stderr,
                    flush=True,
                )
                self.process.kill()
                self.process.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@dataclass
class Mesh:
    services: tuple[str, ...] = ORDER
    redis_url: str | None = None
    default_ports: bool = False
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None  # None: children write to our stdout/stderr
    admin_key: str = "dev-admin-key"
    redis: RedisServer | None = None
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ports = {
            name: DEFAULT_PORTS[name] if self.default_ports else (free_port(), free_port())
            for name in self.services
        }
        if self.redis_url is None:
            self.redis = RedisServer(
                port=6379 if self.default_ports and _port_free(6379) else None,
                data_dir=Path.home() / ".cache" / "speechmesh" / "redis"
                if self.default_ports
                else None,
            )
            self.redis_url = self.redis.url
        for name in self.services:
            prefix = f"SPEECHMESH_{name.upper()}_"
            env = {
                **os.environ,
                "SPEECHMESH_ADMIN_KEY": self.admin_key,
                f"{prefix}PORT": str(ports[name][0]),
                f"{prefix}METRICS_PORT": str(ports[name][1]),
                f"{prefix}REDIS_URL": self.redis_url,
                **{
                    f"SPEECHMESH_GATEWAY_{d.upper()}_TARGET": f"127.0.0.1:{ports[d][0]}"
                    for d in ("auth", "asr", "mt")
                    if d in ports
                },
                **self.env,
            }
            log = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else None  # noqa: SIM115
            self.processes[name] = ServiceProcess(name, ports[name][0], ports[name][1], env, log)

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.processes[name]

    def start(self, timeout_s: float = 300) -> None:
        if self.redis:
            self.redis.start()
        for process in self.processes.values():  # all load their models at once
            process.start()
        for process in self.processes.values():
            process.wait_started(timeout_s)

    def stop(self) -> None:
        for name in reversed(self.services):
            self.processes[name].stop()
        for process in self.processes.values():
            if process.log:
                process.log.close()
        if self.redis:
            if self.default_ports:
                self.redis.stop()  # keep the data between `make run`s
            else:
                self.redis.close()

    def __enter__(self) -> Mesh:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
