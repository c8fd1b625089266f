"""Stopping helper tasks keeps the canceller's own CancelledError (what anyio's cancel scopes rely on)."""

from __future__ import annotations

import asyncio

import pytest

from real_time_audio.ops.tasks import stop_tasks

MESSAGE = "Cancelled by cancel scope 7f00"


async def _child(cleanup_steps: int) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        for _ in range(cleanup_steps):  # a cleanup that yields a few times, like closing a socket
            await asyncio.sleep(0)
        raise


async def _connection(cleanup_steps: int, ended: asyncio.Event) -> None:
    children = [asyncio.create_task(_child(cleanup_steps)), asyncio.create_task(_child(0))]
    await ended.wait()  # the client went away
    await stop_tasks(children)
    await asyncio.sleep(3600)


@pytest.mark.parametrize("cleanup_steps", [0, 1, 2, 3])
def test_a_cancel_during_the_stop_arrives_with_its_own_message(cleanup_steps: int) -> None:
    """Cancelled at every point of its cleanup, the connection task fails with the canceller's message.

    Before stop_tasks, the session's cleanup used asyncio.gather, which for some of these timings
    raised a child's message-less CancelledError; anyio then did not recognise the cancellation as
    its own and the test client's portal failed with CancelledError."""

    async def sweep() -> list[tuple[object, ...]]:
        messages = []
        for spins in range(10):
            ended = asyncio.Event()
            task = asyncio.create_task(_connection(cleanup_steps, ended))
            for _ in range(2):
                await asyncio.sleep(0)
            ended.set()  # the connection ends: stop_tasks starts
            for _ in range(spins):
                await asyncio.sleep(0)
            task.cancel(MESSAGE)  # the scope's cancel, at a different moment each time
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            messages.append(caught.value.args)
        return messages

    assert asyncio.run(sweep()) == [(MESSAGE,)] * 10


def test_stop_tasks_collects_failures_and_waits_for_every_task() -> None:
    async def run() -> tuple[bool, bool]:
        async def fails() -> None:
            await asyncio.sleep(0)
            raise RuntimeError("boom")

        failing = asyncio.create_task(fails())
        await asyncio.sleep(0.01)  # it has failed by now
        sleeping = asyncio.create_task(asyncio.sleep(3600))
        await stop_tasks([failing, sleeping])
        await stop_tasks([])
        return failing.done() and not failing.cancelled(), sleeping.cancelled()

    assert asyncio.run(run()) == (True, True)
