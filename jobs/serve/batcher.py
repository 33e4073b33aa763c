"""Requests that arrive together, decoded as one batch: a replica's own batching.

Ray Serve's `@serve.batch` forms a batch as soon as the previous one is formed, not when the
decoder is free, so under steady load the clients split into groups that alternate (one group
decodes while the other's batch is already closed, waiting), and each group pays a whole decode:
8 clients gave batches of 3-6 and 1.4x one client's throughput (BENCHMARKS.md, "Serving").
Here a batch is closed only when the decoder is free, and it waits, at most `wait_s`, until as
many requests are queued as were active around the last batch (those it served plus those that
queued behind it: the clients that will be back). One client alone never waits; 8 clients come
back within a few ms of their answers and are decoded as one batch again.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class Batcher:
    def __init__(self, run: Callable[[list], list], max_size: int, wait_s: float):
        """run: jobs -> one result per job, called in a thread of its own (one batch at a time)."""
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="m3-decode")
        self.queue: list[tuple[object, asyncio.Future]] = []
        self.active = 1  # requests active around the last batch: how many to wait for
        self.sizes: list[int] = []  # each batch's size (health, tests)
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, job):
        """The job's result, once the batch it joined is decoded."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._loop())
        future = loop.create_future()
        self.queue.append((job, future))
        self._arrived.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.wait_s
            while len(self.queue) < min(self.active, self.max_size):
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, self.queue = self.queue[: self.max_size], self.queue[self.max_size :]
            self.sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self.pool, self.run, [job for job, _ in batch])
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            finally:
                self.active = max(1, len(batch) + len(self.queue))
            for (_, future), result in zip(batch, results):
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result(result)
