import asyncio
import time

from avatar_agent.clock import FakeClock, SystemClock


async def test_fake_clock_runs_an_hour_of_ticks_in_order_and_fast():
    clock = FakeClock()
    seen: list[tuple[float, str]] = []

    async def ticker(name: str, period: float, n: int) -> None:
        for i in range(n):
            await clock.sleep_until((i + 1) * period)
            seen.append((clock.now(), name))

    t = time.perf_counter()
    await asyncio.gather(ticker("video", 0.04, 25 * 600), ticker("audio", 0.02, 100))
    assert time.perf_counter() - t < 30          # virtual: 10 min of ticks, not 10 real minutes
    assert len(seen) == 25 * 600 + 100
    times = [s[0] for s in seen]
    assert times == sorted(times)
    assert abs(clock.now() - 600.0) < 1e-9


async def test_fake_clock_hold_freezes_time_while_thread_work_runs():
    clock = FakeClock()
    loop = asyncio.get_running_loop()
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep_until(1.0)
        woke.append(clock.now())

    task = asyncio.create_task(sleeper())
    with clock.hold():
        await loop.run_in_executor(None, time.sleep, 0.05)
        assert clock.now() == 0.0 and not woke   # no jump while the job was in flight
    await task
    assert woke == [1.0]


async def test_system_clock_sleep_until_reaches_target():
    c = SystemClock()
    t = c.now() + 0.05
    await c.sleep_until(t)
    assert c.now() >= t
    before = c.now()
    await c.sleep_until(before - 10)             # past: returns at once
    assert c.now() - before < 0.05
