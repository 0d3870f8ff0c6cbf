"""`make run`: the whole mesh in the foreground on embedded defaults.

Starts a local redis-server when REDIS_URL is unset (data kept in ~/.cache/speechmesh/redis),
then every service on its default port. Ctrl-C (or SIGTERM) stops them all gracefully; if
one dies, the rest are stopped too.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tools.mesh import Mesh

DEV_ADMIN_KEY = "dev-admin-key"


def main() -> int:
    admin_key = os.environ.get("SPEECHMESH_ADMIN_KEY", DEV_ADMIN_KEY)
    mesh = Mesh(
        redis_url=os.environ.get("REDIS_URL") or None, default_ports=True, admin_key=admin_key
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"starting redis ({mesh.redis_url}) and {', '.join(mesh.services)}", flush=True)
        mesh.start()
        shown = admin_key if admin_key == DEV_ADMIN_KEY else "(from SPEECHMESH_ADMIN_KEY)"
        print(
            f"mesh ready: gateway on localhost:{mesh['gateway'].port}; admin key {shown}",
            flush=True,
        )
        while not stopping and all(
            p.process and p.process.poll() is None for p in mesh.processes.values()
        ):
            time.sleep(0.2)
    finally:
        mesh.stop()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
