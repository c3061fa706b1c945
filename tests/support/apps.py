"""A tiny HTTP app image for tests: Debian's static busybox, built ``FROM scratch``.

No image can be pulled from the internet on the test machines, so the app is busybox's
``httpd`` serving ``/www`` on port 9292:

- ``/health`` answers ``ok``; ``/index.html`` names the revision baked into the image.
- ``/app.js`` is :data:`APP_JS`, 60 KiB of script (``application/javascript``, with a strong
  ETag and ``Accept-Ranges``), for ``--compress``.
- ``/cgi-bin/revision`` answers ``revision=$REVISION`` and, if ``APP_GREETING`` is set,
  `` greeting=$APP_GREETING`` (to see that ``--config-file`` entries reach the container).
- ``/cgi-bin/whoami`` answers ``revision=$REVISION container=$HOSTNAME`` (the container's
  short id, which Docker sets as its host name).
- ``/cgi-bin/slow?SECONDS`` sleeps (default 2, fractions allowed), then answers like whoami.
- ``/cgi-bin/drip`` sends a head with ``Content-Length: 100`` and 5 bytes of body, then
  sleeps 60 s: an answer cut short if the container dies meanwhile.
- ``/cgi-bin/echo`` reads ``CONTENT_LENGTH`` bytes of request body and answers
  ``received=N revision=$REVISION``.
- ``/cgi-bin/fallback`` answers ``container=$HOSTNAME fallback=VALUE``: the request's
  ``X-Wunderproxy-Fallback`` header as the app saw it (empty without one).
- ``/cgi-bin/worker`` is an app with one worker, like unicorn with one process: requests to
  it take turns (a lock), and each holds the worker while it reads its body (answering
  ``received=N``) or, with ``?download=BYTES``, while it writes BYTES zero bytes. A slow
  client holds up every request behind it, unless the proxy buffers.

What busybox httpd 1.35 does, checked by hand against a running container:

- It hands the container's whole environment to CGI scripts, so ``REVISION`` from the launch
  config's ``Env`` reaches them as is; nothing more is needed.
- It serves one request per connection: static files come with ``Connection: close`` and a
  ``Content-Length``; a second request on the same connection is never answered. CGI output is
  sent after a bare ``HTTP/1.1 200 OK`` line with only the headers the script prints, so the
  scripts print ``Content-Length`` and ``Connection: close`` themselves to make every response
  well framed. It sends a CGI body even to ``HEAD``, so the scripts leave it out for ``HEAD``.
- It does not decode a chunked request body: the script then sees no ``CONTENT_LENGTH``.
- As PID 1 it ignores SIGTERM, so ``docker stop`` waits for the whole grace period and then
  kills it (exit 137); with ``HostConfig: {"Init": true}`` it stops at once (exit 143).

``REVISION`` is also baked into the image (``ENV``) as the image's own revision, so each
revision is a distinct image, and a launch config's ``Env`` overrides it.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping

import docker

from wunderproxy.engine import split_image_reference

BUSYBOX = "/bin/busybox"
APP_PORT = "9292/tcp"

# Prints a well-framed CGI answer: body from $1, no body for HEAD (see the module docstring).
# One printf, so that head and body leave in one write, as most apps send a small answer:
# a container killed mid-answer cuts only the answers it had begun.
_RESPOND = r"""respond() {
  head='Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n'
  if [ "$REQUEST_METHOD" = HEAD ]; then
    printf "$head" $((${#1} + 1))
  else
    printf "$head%s\n" $((${#1} + 1)) "$1"
  fi
}
"""

CGI_SCRIPTS = {
    "revision": 'respond "revision=$REVISION${APP_GREETING:+ greeting=$APP_GREETING}"\n',
    "whoami": 'respond "revision=$REVISION container=$HOSTNAME"\n',
    "slow": 'sleep "${QUERY_STRING:-2}"\nrespond "revision=$REVISION container=$HOSTNAME"\n',
    "drip": (
        "printf 'Content-Type: text/plain\\r\\nContent-Length: 100\\r\\n\\r\\nhalf.'\nsleep 60\n"
    ),
    "fallback": 'respond "container=$HOSTNAME fallback=$HTTP_X_WUNDERPROXY_FALLBACK"\n',
    # The lock is a directory (busybox has no flock): mkdir is atomic. Released on exit,
    # also when httpd ends the script because its client left.
    "worker": (
        "until mkdir /worker.lock 2>/dev/null; do usleep 10000; done\n"
        "trap 'rmdir /worker.lock' EXIT\n"
        "trap 'exit 1' INT TERM PIPE HUP\n"
        'case "$QUERY_STRING" in\n'
        "download=*)\n"
        "  size=${QUERY_STRING#download=}\n"
        "  printf 'Content-Type: application/octet-stream\\r\\nContent-Length: %d\\r\\n"
        'Connection: close\\r\\n\\r\\n\' "$size"\n'
        '  head -c "$size" /dev/zero\n'
        "  ;;\n"
        "*)\n"
        '  received=$(head -c "${CONTENT_LENGTH:-0}" | wc -c)\n'
        '  respond "received=$received"\n'
        "  ;;\n"
        "esac\n"
    ),
    "echo": (
        'received=$(head -c "${CONTENT_LENGTH:-0}" | wc -c)\n'
        'respond "received=$received revision=$REVISION"\n'
    ),
}

# A static file worth compressing: busybox httpd serves .js as application/javascript (it
# gives .json no type at all).
APP_JS = "".join(
    f"function handler{number}(request) {{ return render('v{number}', request.id * {number}); }}\n"
    for number in range(800)
).encode()

DOCKERFILE = """FROM scratch
COPY bin /bin
COPY www /www
ENV REVISION={revision}
EXPOSE 9292
ENTRYPOINT ["/bin/busybox"]
CMD ["httpd", "-f", "-p", "9292", "-h", "/www"]
"""


# On the host's network the app listens where wunderproxy says (PORT), and on loopback
# only: a test must never open a port on any other address of the machine.
HOST_NETWORK_CMD = ["sh", "-c", 'exec /bin/busybox httpd -f -p "127.0.0.1:$PORT" -h /www']
"""``Cmd`` for the app on the host's network (the entrypoint is busybox, so ``sh -c``)."""


def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    """Add a file of ``data`` to a build context."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def build_context(revision: str) -> io.BytesIO:
    """The build context of the app image as an in-memory tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add_file(tar, "Dockerfile", DOCKERFILE.format(revision=revision).encode())
        tar.add(BUSYBOX, arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        tar.addfile(link)
        add_file(tar, "www/health", b"ok\n")
        add_file(tar, "www/index.html", f"<h1>testapp {revision}</h1>\n".encode())
        add_file(tar, "www/app.js", APP_JS)
        for name, body in CGI_SCRIPTS.items():
            add_file(tar, f"www/cgi-bin/{name}", f"#!/bin/sh\n{_RESPOND}{body}".encode(), 0o755)
    buffer.seek(0)
    return buffer


def build_app_image(
    client: docker.DockerClient,
    tag: str,
    labels: Mapping[str, str],
    revision: str | None = None,
) -> None:
    """Build the app image as ``tag``; its revision defaults to the tag's tag part."""
    revision = revision or split_image_reference(tag)[1]
    client.images.build(
        fileobj=build_context(revision),
        custom_context=True,
        rm=True,
        forcerm=True,
        tag=tag,
        labels=dict(labels),
    )


def push_app_image(
    client: docker.DockerClient,
    tag: str,
    labels: Mapping[str, str],
    revision: str | None = None,
) -> None:
    """Build the app image as ``tag``, push it, and drop the local copy (launches pull)."""
    build_app_image(client, tag, labels, revision)
    push_image(client, tag)
    client.images.remove(tag)


def push_image(client: docker.DockerClient, tag: str) -> None:
    """Push ``tag`` to its registry; raise if the registry refused it."""
    repository, version = split_image_reference(tag)
    for chunk in client.images.push(repository, tag=version, stream=True, decode=True):
        if "error" in chunk:
            raise RuntimeError(f"pushing {tag} failed: {chunk['error']}")
