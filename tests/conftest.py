"""Suite-wide set-up: the stop costs migrations measure and keep (migration/stopcost.py)
go to a file of this run's own, not to the user's ~/.cache, so a run neither reads what
earlier runs on this host measured nor leaves anything behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from cvmig.migration.stopcost import ENV
from cvmig.psp.mailbox import MailboxClient, PspProcess

Psp = tuple[str, MailboxClient]  # a PSP process's socket and a client to it


def pytest_configure(config: pytest.Config) -> None:
    d = tempfile.mkdtemp(prefix="cvmig-tests-")
    config.stash[_DIR] = d
    os.environ[ENV] = os.path.join(d, "stop-costs.json")  # children inherit it


def pytest_unconfigure(config: pytest.Config) -> None:
    d = config.stash.get(_DIR, None)
    if d is not None:
        shutil.rmtree(d, ignore_errors=True)


_DIR = pytest.StashKey[str]()


@pytest.fixture(scope="module")
def psp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Psp]:
    """A secure processor process for one test module, and a client to it."""
    sock = str(tmp_path_factory.mktemp("psp") / "psp.sock")
    with PspProcess(sock), MailboxClient(sock) as client:
        yield sock, client
