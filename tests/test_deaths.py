"""DeathWatch: Docker's die events followed from a thread, reported on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.support.fakes import FakeEngine
from tests.support.waiting import eventually
from wunderproxy import deaths as deaths_module
from wunderproxy.deaths import DeathWatch


async def test_deaths_reach_the_loop_and_a_lost_stream_is_followed_again_from_before(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(deaths_module, "RECONNECT_INTERVAL", 0.05)
    engine = FakeEngine("127.0.0.1", 1)
    loop_thread: list[int] = []
    seen: list[tuple[str, int | None]] = []

    def on_death(container_id: str, exit_code: int | None) -> None:
        loop_thread.append(threading.get_ident())
        seen.append((container_id, exit_code))

    watch = DeathWatch(engine.deaths, {"wunderproxy.app": "shop"}, on_death)
    engine.unreachable()
    lost_at = time.time()
    watch.start()
    await asyncio.sleep(3)  # an outage of many retries: what died early in it still counts
    assert len(engine.called("deaths")) >= 10
    engine.reachable()
    await eventually(lambda: any(args[1] is not None for args in engine.called("deaths")))
    engine.die("a" * 64, 137)
    await eventually(lambda: seen == [("a" * 64, 137)])
    watch.stop()
    assert loop_thread == [threading.get_ident()], "reported on the event loop's thread"
    first, *again = engine.called("deaths")
    assert first == ({"wunderproxy.app": "shop"}, None), "from now, at first"
    since = again[-1][1]
    assert since is not None and lost_at - 5 <= since <= lost_at, "from before it was lost"
    assert {args[1] for args in again} == {since}, "the same point at every retry"
    warnings = [r for r in caplog.records if "cannot follow" in r.getMessage()]
    assert len(warnings) == 1, "said once per outage, not at each retry"
    await asyncio.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "docker-events"], "stopped"
