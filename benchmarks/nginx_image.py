"""An app image for benchmarks: this machine's nginx in a container, built ``FROM scratch``.

No image can be pulled on these machines, and the tests' busybox ``httpd`` answers one
request per connection, so it cannot show what keep-alive costs. This image copies the host's
``/usr/sbin/nginx`` with the shared libraries ``ldd`` names, and busybox for a shell, into a
scratch image: nginx with one worker serving ``/small.txt`` (the suite's 100-byte answer) and
``/health``.

Where it listens: on a bridge network, port 9292 of the container's own address (Docker
publishes it); with ``PORT`` set (wunderproxy's host-network mode), ``127.0.0.1:$PORT`` only,
never the host's other addresses.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

import docker

from benchmarks.peers import SMALL_BODY
from tests.support.apps import BUSYBOX, add_file

NGINX = "/usr/sbin/nginx"
APP_PORT = "9292/tcp"
HEALTH_PATH = "/health"

CONFIG = """daemon off;
master_process on;
worker_processes 1;
user nobody nogroup;
pid /tmp/nginx.pid;
events {
    worker_connections 16384;
}
http {
    access_log off;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    types {
        text/plain txt;
    }
    server {
        listen @LISTEN@ backlog=4096;
        root /www;
        location = /health {
            return 200 "ok\\n";
        }
    }
}
"""

# PORT set: wunderproxy's host-network mode, loopback only; else the bridge's app port.
ENTRYPOINT = """#!/bin/sh
listen=9292
[ -n "$PORT" ] && listen="127.0.0.1:$PORT"
/bin/busybox sed "s/@LISTEN@/$listen/" /etc/nginx.conf.in > /tmp/nginx.conf
exec /usr/sbin/nginx -p /tmp/ -e stderr -c /tmp/nginx.conf
"""

DOCKERFILE = """FROM scratch
COPY . /
EXPOSE 9292
ENTRYPOINT ["/bin/sh", "/entrypoint.sh"]
"""

_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def shared_libraries(binary: str) -> list[str]:
    """The paths of the shared libraries ``ldd`` names for ``binary``, the loader included."""
    output = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    return [match[1] for line in output.splitlines() if (match := _LDD_LINE.search(line))]


def build_context() -> io.BytesIO:
    """The image's build context as an in-memory tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add_file(tar, "Dockerfile", DOCKERFILE.encode())
        for path in [NGINX, *shared_libraries(NGINX)]:
            # The file's content under the name the loader asks for (symlinks resolved).
            tar.add(str(Path(path).resolve()), arcname=path.lstrip("/"))
        tar.add(BUSYBOX, arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        tar.addfile(link)
        add_file(tar, "entrypoint.sh", ENTRYPOINT.encode(), 0o755)
        add_file(tar, "etc/nginx.conf.in", CONFIG.encode())
        add_file(tar, "etc/passwd", b"root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file(tar, "www/small.txt", SMALL_BODY)
        tmp = tarfile.TarInfo("tmp")
        tmp.type = tarfile.DIRTYPE
        tmp.mode = 0o1777
        tar.addfile(tmp)
    buffer.seek(0)
    return buffer


def build_nginx_image(client: docker.DockerClient, tag: str, labels: Mapping[str, str]) -> None:
    """Build the image as ``tag`` with ``labels``."""
    client.images.build(
        fileobj=build_context(),
        custom_context=True,
        rm=True,
        forcerm=True,
        tag=tag,
        labels=dict(labels),
    )
