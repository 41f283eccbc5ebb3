"""The window exchange: where the upscaler replicas that share one image's UNet windows meet.

Each party of an image (a session) calls gather() with its own windows' values, in the
same sequence of rounds (one per GroupNorm of every UNet call, one per step for the
predictions); a round completes when every party has called, and each gets every
window's values. Plain asyncio: run as a Ray async actor, or in a test's event loop.
"""

from __future__ import annotations

import asyncio
import resource


class ExchangeError(RuntimeError):
    """A session was aborted or timed out: its parties cannot finish the image."""


class _Session:
    def __init__(self, parties: int):
        self.parties = parties
        self.rounds_done = 0
        self.values: dict = {}
        self.arrived = 0
        self.merged: asyncio.Future = asyncio.get_running_loop().create_future()

    def next_round(self) -> None:
        self.rounds_done += 1
        self.values, self.arrived = {}, 0
        self.merged = asyncio.get_running_loop().create_future()


class WindowExchange:
    def __init__(self, join_timeout_s: float, round_timeout_s: float):
        # The first round waits for every party to start, which may be queued behind other work on
        # its replica; later rounds only wait for the other parties' UNet between two GroupNorms.
        self._join_timeout_s = join_timeout_s
        self._round_timeout_s = round_timeout_s
        self._sessions: dict[str, _Session] = {}
        # Aborted sessions, with why: a party that starts after the abort fails at once.
        self._aborted: dict[str, str] = {}

    async def gather(self, session: str, parties: int, part: dict) -> dict:
        """This party's windows' values (index -> value) in; every window's values out."""
        if session in self._aborted:
            raise ExchangeError(f"session {session} was aborted: {self._aborted[session]}")
        if session not in self._sessions:
            self._sessions[session] = _Session(parties)
        state = self._sessions[session]
        merged, first_round = state.merged, state.rounds_done == 0
        state.values.update(part)
        state.arrived += 1
        if state.arrived == state.parties:
            merged.set_result(state.values)
            state.next_round()
        timeout = self._join_timeout_s if first_round else self._round_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(merged), timeout)
        except TimeoutError:
            self.abort(session, f"a round waited over {timeout:g} s for the other parties")
            raise ExchangeError(f"session {session}: a round waited over {timeout:g} s") from None

    def abort(self, session: str, reason: str) -> None:
        """Fails the session's waiting and later gathers with `reason`."""
        self._aborted[session] = reason
        state = self._sessions.pop(session, None)
        if state is not None and state.arrived:  # parties are waiting on this round
            state.merged.set_exception(ExchangeError(f"session {session} was aborted: {reason}"))
            # Marked as seen: the parties that gave up waiting no longer look at it.
            state.merged.exception()

    def close(self, session: str) -> None:
        """Forgets a session whose parties have all finished."""
        self._sessions.pop(session, None)

    def sessions(self) -> int:
        """Sessions open now."""
        return len(self._sessions)

    def peak_rss_bytes(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
