"""Fixtures for the deploy stack's checks: the Debian tools that validate its files.

CI installs them (.ci/run); on a machine without one, the tests that need it are skipped
with the package to install.
"""

from __future__ import annotations

import shutil

import pytest

from loadtest.bench.services import find_nginx


def require_tool(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package})")
    return path


@pytest.fixture
def promtool() -> str:
    return require_tool("promtool", "prometheus")


@pytest.fixture
def amtool() -> str:
    return require_tool("amtool", "prometheus-alertmanager")


@pytest.fixture
def docker_compose() -> str:
    return require_tool("docker-compose", "docker-compose")


@pytest.fixture
def prometheus_binary() -> str:
    return require_tool("prometheus", "prometheus")


@pytest.fixture
def nginx_binary() -> str:
    # /usr/sbin is not on every user's PATH; find_nginx also looks there.
    path = find_nginx()
    if path is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    return path
