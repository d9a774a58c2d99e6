"""A stand-in worker for the supervisor tests (`test_workers.py`): answers the supervisor's
liveness probes from its event loop (`fedgate.workers.answer_liveness`, as a gateway worker
does) and shares a TCP port with its siblings (SO_REUSEPORT), answering each connection with
its pid. `python liveness_worker.py FD PORT [exit-after-seconds]`; an alarm bounds its life."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedgate.workers import answer_liveness


async def main(fd: int, port: int, exit_after: float) -> None:
    loop = asyncio.get_running_loop()
    answer_liveness(fd)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{os.getpid()}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, reuse_port=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if exit_after:
        loop.call_later(exit_after, os._exit, 3)  # a crash, no goodbye
    async with server:
        await stop.wait()


if __name__ == "__main__":
    signal.alarm(60)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3] if sys.argv[3:] else 0)))
