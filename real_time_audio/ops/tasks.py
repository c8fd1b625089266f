"""Stopping a connection's helper tasks without hiding why the connection itself is stopping."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def stop_tasks(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel the tasks and wait until every one has finished.

    If the caller is cancelled while it waits, the CancelledError it sees is its own, with the
    canceller's message. (``asyncio.gather`` may instead hand back a child's message-less
    CancelledError, which a cancel scope such as anyio's then fails to recognise as its own and
    lets escape.) The tasks' own outcomes are collected so that none is reported as unretrieved.
    """
    tasks = set(tasks)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    try:
        await asyncio.wait(tasks)
    finally:
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()
