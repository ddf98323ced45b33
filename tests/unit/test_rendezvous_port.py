"""The rendezvous port check (engine.runtime.distributed.check_rendezvous_port): rank 0 refuses a MASTER_PORT
another process listens on, before the process group starts; other ranks and torchrun's workers (whose agent
holds the port by design) do not look. End to end: the port-in-use case of tests/helpers/bad_input_cases.py
and tests/smoke/test_start_up.py."""
from __future__ import annotations

import socket

import pytest

from engine.errors import UserError
from engine.runtime.distributed import check_rendezvous_port


@pytest.fixture
def busy_port(monkeypatch):
    with socket.socket() as other_job:
        other_job.bind(("127.0.0.1", 0))
        other_job.listen()
        port = other_job.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        yield port


def test_rank_0_refuses_a_busy_port_naming_it_and_a_free_one(busy_port):
    with pytest.raises(UserError, match=rf"^port {busy_port} \(MASTER_PORT, the rendezvous port\) is in use on this "
                       r"machine, probably by another job; pick a free one: deepspeed --master_port (\d+) \.\.\."):
        check_rendezvous_port()


def test_a_free_port_passes(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    check_rendezvous_port()


def test_other_ranks_and_torchruns_workers_do_not_look(busy_port, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a client of rank 0's store: the port is meant to be taken
    check_rendezvous_port()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's agent hosts the store
    check_rendezvous_port()
