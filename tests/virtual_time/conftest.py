"""Every test under this folder runs on virtual time (tests/vtime.py): its event loop's clock,
the kernel's one clock, jumps ahead when every task waits."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from vtime import VirtualTimeLoop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], VirtualTimeLoop]]:
    return {"virtual-time": VirtualTimeLoop}
