"""textinv.cpu: torch's threads on cores that other programs share."""
from __future__ import annotations

import torch

from textinv import cpu


def test_threads_leave_the_busy_cores_alone():
    assert cpu.threads_for(2, 0.0) == 2
    assert cpu.threads_for(2, 0.4) == 2  # a little background work is not a busy core
    assert cpu.threads_for(2, 1.0) == 1
    assert cpu.threads_for(2, 3.5) == 1  # never fewer than one
    assert cpu.threads_for(8, 2.6) == 5
    assert cpu.threads_for(4, None) == 4  # the system does not say: every core


def test_jiffies_read_the_first_line_of_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n")
    assert cpu._jiffies(str(stat)) == (160, 980)  # busy = all but idle (800) and iowait (20)
    stat.write_text("garbage\n")
    assert cpu._jiffies(str(stat)) is None
    assert cpu._jiffies(str(tmp_path / "absent")) is None
    assert cpu.busy_cores(0.0, str(tmp_path / "absent")) is None


def test_a_users_omp_num_threads_stands(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cpu, "busy_cores", lambda: 99.0)
    before = torch.get_num_threads()
    assert cpu.share_cores() is None and torch.get_num_threads() == before


def test_busy_cores_lower_torchs_threads_and_never_raise_them(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(cpu, "busy_cores", lambda: 2.0)
        assert cpu.share_cores() == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(cpu, "busy_cores", lambda: 0.0)
        assert cpu.share_cores() == 2  # a quiet moment later does not add threads back
    finally:
        torch.set_num_threads(before)
