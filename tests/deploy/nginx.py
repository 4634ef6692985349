"""deploy/nginx/gateway.conf as tests use it: inside a main configuration like the nginx
image's own (which includes conf.d/*.conf in its http block), with the upstream's service
name resolved to the addresses a test gives, for Debian's nginx to check (``nginx -t``) or
to run.

The file's upstream names the compose service (``server gateway:8000 resolve``): nginx
resolves it through Docker's DNS, which no test has, and ``resolve`` needs nginx 1.27.3 or
later, where Debian 12 has 1.22. So the copy lists the given addresses instead, with the
line's other parameters; everything else is the file as it is.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.deploy.compose import DEPLOY

NGINX_CONF_PATH = DEPLOY / "nginx" / "gateway.conf"
# The one upstream server line, and the one listen line, that a copy rewrites.
UPSTREAM_SERVER = re.compile(
    r"^(?P<indent>[ \t]*)server[ \t]+(?P<host>[\w.-]+):(?P<port>\d+)"
    r"[ \t]+resolve(?P<params>[^;\n]*);",
    re.MULTILINE,
)
LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+(?P<port>\d+);", re.MULTILINE)


def upstream_server() -> tuple[str, int]:
    """(service name, port) of the file's upstream server."""
    (match,) = UPSTREAM_SERVER.finditer(NGINX_CONF_PATH.read_text(encoding="utf-8"))
    return match.group("host"), int(match.group("port"))


def listen_port() -> int:
    """The port the file's server listens on (inside the container)."""
    (match,) = LISTEN.finditer(NGINX_CONF_PATH.read_text(encoding="utf-8"))
    return int(match.group("port"))


def site_copy(upstreams: Sequence[str], listen: str | None = None) -> str:
    """The file with its upstream server resolved to ``upstreams`` (``host:port`` each), and
    its listen address replaced by ``listen`` if given."""
    text = NGINX_CONF_PATH.read_text(encoding="utf-8")
    (server,) = UPSTREAM_SERVER.finditer(text)
    params = server.group("params")
    lines = "\n".join(f"{server.group('indent')}server {addr}{params};" for addr in upstreams)
    text = text[: server.start()] + lines + text[server.end() :]
    if listen is not None:
        (match,) = LISTEN.finditer(text)
        line = f"{match.group('indent')}listen {listen};"
        text = text[: match.start()] + line + text[match.end() :]
    return text


def main_config(workdir: Path, site: Path, *, workers: int = 1) -> str:
    """A main configuration shaped like the nginx image's /etc/nginx/nginx.conf (which runs
    in the foreground, as the image does), with every path it writes under ``workdir``, that
    includes ``site`` in its http block."""
    return f"""
daemon off;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {workdir}/access.log;
    sendfile on;
    keepalive_timeout 65;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    include {site};
}}
"""


def write_config(
    workdir: Path, upstreams: Sequence[str], listen: str | None = None, *, workers: int = 1
) -> Path:
    """The site copy and a main configuration around it, written into ``workdir``; the
    main configuration's path."""
    site = workdir / "gateway.conf"
    site.write_text(site_copy(upstreams, listen), encoding="utf-8")
    main = workdir / "nginx.conf"
    main.write_text(main_config(workdir, site, workers=workers), encoding="utf-8")
    return main


def check_config(binary: str, main: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``main``: what the validator says, and its exit status."""
    return subprocess.run(
        [binary, "-t", "-c", str(main), "-e", str(main.parent / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
