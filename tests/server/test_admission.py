"""Loop-lag shedding (server.core.admission) sheds only when requests wait behind a late event loop: a loop that is
late because other processes hold the CPU while the server is idle refuses no one."""
from __future__ import annotations

import asyncio
import time

from server.core.admission import Admission, LoopMonitor


async def _late_loop(monitor: LoopMonitor, ticks: int, requests: Admission | None) -> None:
    """Block the loop for 3x the lag bound, ``ticks`` times (a busy host), a request arriving each time if given."""
    for _ in range(ticks):
        time.sleep(3 * monitor.lag_s)
        if requests is not None:
            requests.refusal()
        await asyncio.sleep(0.002)                      # the monitor's tick runs, late


def test_a_late_loop_on_an_idle_server_refuses_no_one():
    async def main() -> tuple[str | None, str | None]:
        monitor = LoopMonitor(0.02)
        monitor.start()
        admission = Admission(limit=64, monitor=monitor)
        await _late_loop(monitor, 6, None)              # the host is busy, no request arrives
        first = admission.refusal()                     # the first request after the pause
        await _late_loop(monitor, 6, admission)         # now requests keep arriving behind a late loop
        during = admission.refusal()
        await monitor.stop()
        return first, during

    first, during = asyncio.run(main())
    assert first is None
    assert during is not None and "event loop runs" in during
