"""The replica's batcher (jobs/serve/batcher.py): one client never waits; clients that come back
after their answers are decoded together again instead of splitting into alternating groups."""

from __future__ import annotations

import asyncio
import time

from jobs.serve.batcher import Batcher


def decode(jobs: list) -> list:
    time.sleep(0.05)  # a decode: the same cost whatever the batch
    return [j * 10 for j in jobs]


def test_one_client_never_waits_for_a_batch():
    async def main():
        # a batch that waited for a second request would wait an hour: wait_for's bound is then
        # what fails, whatever this machine's speed (no timing is asserted)
        b = Batcher(decode, max_size=8, wait_s=3600.0)
        for i in range(5):
            assert await asyncio.wait_for(b.submit(i), 60) == i * 10
        return b.sizes

    assert asyncio.run(main()) == [1] * 5


def test_clients_coming_back_are_decoded_as_one_batch():
    async def main():
        b = Batcher(decode, max_size=8, wait_s=0.5)

        async def client(k):
            await asyncio.sleep(0.003 * k)  # arriving apart, as real clients do
            for _ in range(6):
                assert await b.submit(k) == k * 10
                await asyncio.sleep(0.002 * (k % 3))  # each comes back after its own delay

        await asyncio.gather(*(client(k) for k in range(8)))
        return b.sizes

    sizes = asyncio.run(main())
    # the first batch takes whoever came (no one was active before); then every client is in
    # each batch, but the last, short of those that started first and so finished first
    assert sum(sizes) == 48 and len(sizes) <= 7 and set(sizes[1:-1]) == {8}, sizes


def test_an_error_reaches_every_request_of_its_batch():
    def broken(jobs):
        raise ValueError("the decode failed")

    async def main():
        b = Batcher(broken, max_size=4, wait_s=0.0)
        return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)

    assert all(isinstance(r, ValueError) for r in asyncio.run(main()))
