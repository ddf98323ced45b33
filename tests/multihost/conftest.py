"""The multihost tier: hosts made of network namespaces on one machine (tests/helpers/netns.py).

Each test file is marked `multihost`; `python -m pytest -q -m multihost` runs them (not in the default run;
`.ci/run` runs them as root). Without root, `ip` or namespace support every test here is skipped, saying why.
"""
from __future__ import annotations

import pytest

from tests.helpers import netns


@pytest.fixture(scope="session")
def netns_ok() -> None:
    """Skips the test, saying why, where namespaces cannot be made."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def hosts(netns_ok, tmp_path):
    """Two hosts (node0, node1), torn down after the test, whatever happens."""
    with netns.Hosts(2, tmp_path) as made:
        yield made


@pytest.fixture
def make_hosts(netns_ok, tmp_path):
    """make_hosts(n=2, private=[...]) -> Hosts, for a test that needs three hosts or node-local folders; every
    set made is torn down after the test."""
    made = []

    def make(n: int = 2, private=()):
        h = netns.Hosts(n, tmp_path / f"hosts{len(made)}", private=list(private))
        made.append(h)
        return h.__enter__()

    yield make
    for h in made:
        h.close()
