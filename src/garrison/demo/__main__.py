"""`python -m garrison.demo`: serve the demo app on loopback and announce the bound address.

The single announcement line is the contract with whoever starts us (`garrison up --demo`,
tests): they read it to learn the ephemeral port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiohttp import web

from garrison.demo.app import make_app


async def serve(host: str, port: int) -> None:
    """Bind, announce, and run until SIGTERM/SIGINT."""
    # handler_cancellation: a client that goes away cancels its stream, like a real model
    # server freeing the GPU; a short shutdown_timeout keeps SIGTERM prompt mid-stream.
    runner = web.AppRunner(
        make_app(),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"demo app listening on http://{shown}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m garrison.demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
