"""The label server's admission control (medunet.label.gate): bounded running + waiting, Busy beyond."""

from __future__ import annotations

import asyncio

import pytest

from medunet.label.gate import Busy, InferGate, gate_from_conf


def test_gate_runs_a_bounded_number_and_refuses_beyond_the_queue():
    async def scenario():
        gate = InferGate(running=2, waiting=3)
        release = asyncio.Event()
        active = []
        peak_running = 0

        async def request(i):
            nonlocal peak_running
            async with gate.admit():
                active.append(i)
                peak_running = max(peak_running, len(active))
                await release.wait()
                active.remove(i)
            return i

        tasks = [asyncio.create_task(request(i)) for i in range(9)]
        await asyncio.sleep(0.05)
        assert gate.admitted == 5 and len(active) == 2
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return gate, results, peak_running

    gate, results, peak_running = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, Busy)]
    assert len(refused) == 4 and all("server busy" in str(r) for r in refused)
    assert sorted(r for r in results if isinstance(r, int)) == [0, 1, 2, 3, 4]
    assert peak_running == 2
    assert gate.stats() == {"running": 2, "waiting": 3, "admitted": 0, "served": 5, "refused": 4, "peak": 5}


def test_a_failing_request_frees_its_slot():
    async def scenario():
        gate = InferGate(running=1, waiting=0)
        with pytest.raises(ValueError):
            async with gate.admit():
                raise ValueError("bad image")
        async with gate.admit():
            pass
        return gate

    gate = asyncio.run(scenario())
    assert gate.admitted == 0 and gate.served == 1 and gate.refused == 0


def test_gate_settings_from_conf():
    gate = gate_from_conf({"infer_concurrency": "2", "infer_queue": "0"})
    assert (gate.running, gate.waiting) == (2, 0)
    assert (gate_from_conf(None).running, gate_from_conf(None).waiting) == (1, 16)
    with pytest.raises(ValueError, match="infer_queue 'many'"):
        gate_from_conf({"infer_queue": "many"})
    with pytest.raises(ValueError, match="running >= 1"):
        gate_from_conf({"infer_concurrency": "0"})
