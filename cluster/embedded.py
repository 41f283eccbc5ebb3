"""A farm running on a background thread of this process, for the CLI and tests."""

from __future__ import annotations

import asyncio
import threading

from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.server import Farm


class EmbeddedFarm:
    """``with EmbeddedFarm(config) as farm: Client(farm.address)...``"""

    def __init__(self, config: FarmConfig):
        self.farm = Farm(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="renderfarm", daemon=True)

    @property
    def address(self) -> str:
        return self.farm.address

    @property
    def metrics_port(self) -> int | None:
        return self.farm.metrics_port

    @property
    def web_port(self) -> int | None:
        return self.farm.web_port

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> EmbeddedFarm:
        # Ray installs signal handlers, which only the main thread may do.
        self.farm.connect_ray()
        self._thread.start()
        try:
            self._run(self.farm.start())
        except BaseException:
            self._close_loop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._run(self.farm.stop())
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
