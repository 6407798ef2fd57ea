"""Load and sampling client for the failover benchmarks; runs in the lab's client namespace.

``python httpload.py URL RATE SECONDS OUT``: PUT ``/kv/lN`` at RATE requests per second
(each with a short timeout) and GET ``/whoami`` every 10 ms, for SECONDS or until SIGTERM;
then writes every request's start time, outcome and answering node to OUT as JSON. Prints
``{"ready": true}`` once running.

Before that it warms up for ``WARMUP`` seconds at RATE, not recorded: a cold client opens
its pool of connections all at once, and at 1,000 requests/s the first hundred requests
timed out waiting for them (before any switchover), which is the client's start, not
something a role change did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import aiohttp

WARMUP = 1.0  # seconds at the full rate before anything is recorded


async def main(url: str, rate: float, seconds: float, out: str) -> None:
    writes: list[tuple[float, bool]] = []
    samples: list[tuple[float, str | None]] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    timeout = aiohttp.ClientTimeout(total=0.5)
    # Kept-alive connections, as a web client keeps them: a switchover breaks the ones to
    # the old active (counted as failures), and new ones go to the new active.
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def put(i: int, record: bool = True) -> None:
            started = time.time()
            try:
                async with session.put(f"{url}/kv/l{i}", data=b"x" * 64) as response:
                    ok = response.status == 201
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if record:
                writes.append((started, ok))

        warm = []
        for n in range(int(rate * WARMUP)):  # spread over WARMUP, as the real load will be
            warm.append(asyncio.create_task(put(-n - 1, record=False)))
            await asyncio.sleep(1 / rate)
        if warm:
            await asyncio.wait(warm)

        async def sample() -> None:
            while not stop.is_set():
                started = time.time()
                node = None
                try:
                    async with session.get(f"{url}/whoami") as response:
                        node = (await response.json())["node"]
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                    pass
                samples.append((started, node))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        print(json.dumps({"ready": True}), flush=True)
        tasks: set[asyncio.Task[None]] = set()
        begin = time.monotonic()
        i = 0
        while not stop.is_set() and time.monotonic() - begin < seconds:
            i += 1
            task = asyncio.create_task(put(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            delay = begin + i / rate - time.monotonic() if rate > 0 else 0.1
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        stop.set()
        await sampler
        if tasks:
            await asyncio.wait(tasks)
    text = json.dumps({"writes": writes, "samples": samples})
    await asyncio.to_thread(Path(out).write_text, text)
    print(json.dumps({"writes": len(writes), "samples": len(samples)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
