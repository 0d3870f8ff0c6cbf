"""`make run`: the whole mesh in the foreground on embedded defaults.

Starts a local redis-server when REDIS_URL is unset, then each service as a child process
on its default ports. Ctrl-C (or SIGTERM) stops them all gracefully; if one dies, the rest
are stopped too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from services.common.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DEV_ADMIN_KEY = "dev-admin-key"

# Started in this order; each entry is (name, env prefix).
SERVICES = [("auth", "SPEECHMESH_AUTH_")]


def main() -> int:
    env = dict(os.environ)
    redis: RedisServer | None = None
    redis_url = env.get("REDIS_URL")
    if not redis_url:
        redis = RedisServer(
            port=6379 if _port_free(6379) else None,
            data_dir=Path.home() / ".cache" / "speechmesh" / "redis",
        )
        redis.start()
        redis_url = redis.url
        print(f"redis-server on {redis_url} (data in {redis.dir})", flush=True)
    env.setdefault("SPEECHMESH_ADMIN_KEY", DEV_ADMIN_KEY)
    children: list[subprocess.Popen[bytes]] = []
    for name, prefix in SERVICES:
        env.setdefault(f"{prefix}REDIS_URL", redis_url)
        children.append(
            subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, cwd=ROOT)
        )
    admin = "from SPEECHMESH_ADMIN_KEY" if "SPEECHMESH_ADMIN_KEY" in os.environ else DEV_ADMIN_KEY
    print(f"mesh starting: {', '.join(n for n, _ in SERVICES)}; admin key: {admin}", flush=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        if redis:
            redis.stop()
    failed = [c.returncode for c in children if c.returncode not in (0, None, -signal.SIGTERM)]
    return 1 if failed and not stopping else 0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    sys.exit(main())
