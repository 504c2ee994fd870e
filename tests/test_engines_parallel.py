"""Data-parallel CPU training (medunet.engines.parallel + train_recipe under a gloo process group).

Real worker processes are spawned (loopback only): two workers with one sample each must train exactly
like one process on the two-sample batch, agree on when to evaluate and stop under a wall-clock budget,
and share the validation cases between them.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from medunet.data.cached import CachedCase
from medunet.engines import parallel
from medunet.engines.recipes import RecipeConfig, evaluate_cases_sharded, train_recipe
from medunet.io import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed batches of 2: image ``(2, 1, 8, 8, 8)``, label ``(2, 1, 8, 8, 8)`` in {0, 1, 2}."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
        image = label.float() + 0.5 * torch.randn(label.shape, generator=g)
        out.append((image, label))
    return out


def _ce(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output.float(), label[:, 0])


def _config(**kw) -> RecipeConfig:
    base = {"lr": 1e-2, "max_iterations": 6, "time_budget_s": None, "eval_interval_s": 0, "warmup_iterations": 0,
            "bf16": False}
    return RecipeConfig(**{**base, **kw})


def _own_listening_addresses() -> list[str] | None:
    """IPv4/IPv6 addresses this process listens on (TCP), from /proc; ``None`` where /proc has no sockets."""
    base = Path("/proc/self")
    if not (base / "net" / "tcp").exists():
        return None
    inodes = set()
    for fd in (base / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        path = base / "net" / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # state LISTEN, one of our sockets
                found.append(cols[1].rsplit(":", 1)[0])
    return found


def _is_loopback(hex_address: str) -> bool:
    if len(hex_address) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return hex_address.endswith("7F")
    return hex_address in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def _half_batch_worker(rank: int, world_size: int, out_dir: str) -> None:
    batches = iter(_batches(6))

    def next_batch():
        image, label = next(batches)
        return image[rank:rank + 1], label[rank:rank + 1]

    net = _network()
    history = train_recipe(net, next_batch, _ce, _config(), log=None)
    listening = _own_listening_addresses()
    save_checkpoint({"state": net.state_dict(), "history": history,
                     "listening": listening if listening is not None else ["n/a"]}, f"{out_dir}/rank{rank}.pt")


def test_two_workers_with_half_batches_train_like_one_process(tmp_path):
    reference = _network()
    batches = iter(_batches(6))
    ref_history = train_recipe(reference, lambda: next(batches), _ce, _config(), log=None)

    parallel.spawn_cpu_workers(_half_batch_worker, 2, args=(str(tmp_path),), threads_per_worker=1)
    ranks = [load_checkpoint(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for trained in ranks:
        assert trained["history"][-1]["iteration"] == 6
        # averaged gradients of the halves == gradient of the whole batch (mean losses, equal sizes)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(trained["state"][key], value, atol=2e-5, rtol=1e-4)
        # the logged loss is the mean over ranks, i.e. the whole batch's loss
        assert trained["history"][-1]["loss"] == pytest.approx(ref_history[-1]["loss"], rel=1e-4)
        # gloo's sockets listen on the loopback interface only
        if trained["listening"] != ["n/a"]:
            assert trained["listening"] and all(_is_loopback(a) for a in trained["listening"]), trained["listening"]
    # and training moved the weights at all (the comparison above is not between two copies of the start)
    start = _network().state_dict()
    assert any(not torch.allclose(start[k], v) for k, v in reference.state_dict().items())


def _case(i: int) -> CachedCase:
    label = torch.zeros(1, 8, 8, 8, dtype=torch.uint8)
    label[:, 2:6, 2:6, 2:6] = 1 + i % 2
    return CachedCase(f"case{i}", label.float(), label, "", "")


def _budget_worker(rank: int, world_size: int, out_dir: str) -> None:
    g = torch.Generator().manual_seed(rank)

    def next_batch():
        if rank == 1:
            time.sleep(0.01)  # one rank slower than the other: their own clocks would disagree
        label = torch.randint(0, 3, (1, 1, 8, 8, 8), generator=g)
        return label.float(), label

    seen: list[list[str]] = []

    def evaluate(net) -> dict:
        rows = evaluate_cases_sharded(net, [_case(i) for i in range(5)], 3)
        seen.append(sorted(r["case"] for r in rows))
        return {"cases": float(len(rows))}

    net = _network()
    history = train_recipe(net, next_batch, _ce, _config(max_iterations=None, time_budget_s=1.5,
                                                         eval_interval_s=0.4), evaluate=evaluate, log=None)
    save_checkpoint({"history": history, "seen": seen}, f"{out_dir}/rank{rank}.pt")


def test_workers_agree_on_evaluations_and_stop_and_share_validation(tmp_path):
    parallel.spawn_cpu_workers(_budget_worker, 2, args=(str(tmp_path),), threads_per_worker=1)
    r0, r1 = (load_checkpoint(tmp_path / f"rank{r}.pt") for r in (0, 1))
    its0 = [h["iteration"] for h in r0["history"]]
    assert its0 == [h["iteration"] for h in r1["history"]]  # same evaluation points, same last step
    assert len(its0) >= 3 and r0["history"][-1]["final"]
    assert max(h["elapsed_s"] for h in r0["history"]) >= 1.4
    everyone = [f"case{i}" for i in range(5)]
    assert r0["seen"] == r1["seen"] == [everyone] * len(its0)  # each rank scored its share, all gathered


def _failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("worker one failed on purpose")


def test_a_failing_worker_fails_the_spawn_with_its_message(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    with pytest.raises(Exception, match="worker one failed on purpose"):
        parallel.spawn_cpu_workers(_failing_worker, 2, threads_per_worker=1)
    assert "GLOO_SOCKET_IFNAME" not in os.environ  # the caller's environment is left as it was


def test_world_without_a_process_group_and_gather_is_identity():
    assert parallel.world() == (0, 1)
    assert parallel.all_gather_list([3, 4]) == [3, 4]


def test_default_workers_and_loopback_interface():
    assert parallel.default_workers(2, cpu_count=2) == 2
    assert parallel.default_workers(2, cpu_count=1) == 1
    assert parallel.default_workers(3, cpu_count=8) == 1  # an odd batch does not split evenly
    assert parallel.default_workers(1, cpu_count=8) == 1
    name = parallel.loopback_interface()
    if name is None:
        pytest.skip("this system lists no loopback interface")
    assert name in [n for _, n in socket.if_nameindex()]
    with pytest.raises(ValueError, match="nprocs"):
        parallel.spawn_cpu_workers(_failing_worker, 0)
