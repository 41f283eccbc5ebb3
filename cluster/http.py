"""The scheduler's HTTP ports (the web page, /metrics): an aiohttp app on the farm's event loop."""

from __future__ import annotations

from aiohttp import web


class HttpServer:
    def __init__(self, runner: web.AppRunner, port: int):
        self._runner = runner
        self.port = port

    async def stop(self) -> None:
        await self._runner.cleanup()


async def serve(app: web.Application, host: str, port: int) -> HttpServer:
    """Serves `app` on host:port (0: a free port) until stopped."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return HttpServer(runner, runner.addresses[0][1])
