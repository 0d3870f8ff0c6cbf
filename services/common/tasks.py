"""Stopping background tasks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("speechmesh.tasks")


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancels background tasks and waits until they have ended.

    `with suppress(CancelledError): await task` would also swallow a cancellation of the
    caller (a shutdown given up on by its own timeout would carry on as if nothing
    happened); asyncio.wait ends with the tasks and leaves the caller's cancellation alone.
    """
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    if not running:
        return
    await asyncio.wait(running)
    for task in running:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
