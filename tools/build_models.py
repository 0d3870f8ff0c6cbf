"""`make models`: builds every model the services run into the cache outside git.

Each builder is idempotent (a stamp per model), so a second run does nothing.
"""

from __future__ import annotations

import importlib
import sys

# Module whose main() builds one service's models; filled in as services land.
BUILDERS: list[str] = ["services.asr.build_models", "services.mt.build_models"]


def main() -> int:
    for module in BUILDERS:
        code = importlib.import_module(module).main()
        if code:
            return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
