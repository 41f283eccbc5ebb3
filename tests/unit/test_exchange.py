"""The window exchange without Ray: rounds, abort and timeouts, on a plain event loop."""

import asyncio

import pytest

from renderfarm.actors.exchange import ExchangeError, WindowExchange


def test_each_round_gives_every_party_every_windows_values():
    async def parties() -> None:
        exchange = WindowExchange(join_timeout_s=5, round_timeout_s=5)
        first = await asyncio.gather(exchange.gather("image", 2, {0: "a"}), exchange.gather("image", 2, {1: "b", 2: "c"}))
        assert first == [{0: "a", 1: "b", 2: "c"}] * 2
        second = await asyncio.gather(exchange.gather("image", 2, {1: "y"}), exchange.gather("image", 2, {0: "x"}))
        assert second == [{0: "x", 1: "y"}] * 2
        assert exchange.sessions() == 1
        exchange.close("image")
        assert exchange.sessions() == 0

    asyncio.run(parties())


def test_an_abort_releases_the_waiting_parties_and_fails_the_late_ones():
    async def parties() -> None:
        exchange = WindowExchange(join_timeout_s=5, round_timeout_s=5)
        waiting = asyncio.create_task(exchange.gather("image", 3, {0: 1}))
        await asyncio.sleep(0)
        exchange.abort("image", "ActorDiedError: party 2 died")
        with pytest.raises(ExchangeError, match="party 2 died"):
            await waiting
        with pytest.raises(ExchangeError, match="party 2 died"):
            await exchange.gather("image", 3, {1: 1})
        assert exchange.sessions() == 0

    asyncio.run(parties())


def test_a_round_that_waits_too_long_fails_every_party():
    async def parties() -> None:
        exchange = WindowExchange(join_timeout_s=5, round_timeout_s=0.05)
        await asyncio.gather(exchange.gather("image", 2, {0: 1}), exchange.gather("image", 2, {1: 1}))
        with pytest.raises(ExchangeError, match="waited over 0.05 s"):
            await exchange.gather("image", 2, {0: 2})
        with pytest.raises(ExchangeError, match="aborted"):
            await exchange.gather("image", 2, {1: 2})

    asyncio.run(parties())
