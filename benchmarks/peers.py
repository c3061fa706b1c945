"""The processes a benchmark compares: an nginx backend, and nginx, haproxy and wunderproxy
in front of it, each started from its own configuration in a temporary directory.

Every process is started by this module, pinned to a CPU with ``taskset``, watched through
``/proc`` (CPU time, resident memory) and stopped by its PID: SIGTERM, then SIGKILL after a
timeout. Each asks the kernel for SIGTERM should the benchmark die first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SMALL_BODY = (
    b"wunderproxy benchmark: a small static answer, about one hundred bytes long, ends here\n"
)
LARGE_SIZE = 1024 * 1024
JSON_PATH = "/100k.json"
JSON_SIZE = 100 * 1024
POST_PATH = "/post"

# A line of nginx's, haproxy's or Python's log that tells of a problem.
_PROBLEM = re.compile(r"\[(warn|error|crit|alert|emerg)\]|WARNING|ERROR|ALERT|Traceback", re.I)
# proxy_only.py has no store on purpose: it says so at start-up.
_EXPECTED = ("no current.json in none://",)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
_LIBC_NAME = ctypes.util.find_library("c")
# Loaded here, not in the forked child, where looking a library up would run programs.
_LIBC = ctypes.CDLL(_LIBC_NAME, use_errno=True) if _LIBC_NAME else None


def raise_open_files(limit: int) -> int:
    """Raise this process's open-file limits (children inherit them); the soft limit set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        wanted = hard if hard != resource.RLIM_INFINITY else soft
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_files_limit() -> int:
    """The soft open-file limit that children started now inherit."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark process dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- /proc ----------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of ``/proc/PID/stat`` after the command name: index 0 is field 3 (state)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks after boot), or None when it is gone."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, from every thread's ``children`` file."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that run now."""
    tree = [pid]
    for parent in tree:
        tree.extend(children(parent))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all processors spent on anything but idling (user, nice, system, interrupts)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to other machines while ours wanted it (steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return int(fields[7]) / _CLOCK_TICKS if len(fields) > 7 else 0.0


def rss_kib(pids: list[int]) -> int:
    """Resident memory (VmRSS) of the processes, summed, in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def socket_count(pids: list[int]) -> int:
    """Open sockets of the processes (a socket shared by several counts once per process)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/fd") as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    total += os.readlink(entry.path).startswith("socket:")
    return total


def loads_library(pid: int, fragment: str) -> bool:
    """Whether a file whose path contains ``fragment`` is mapped into the process."""
    try:
        return fragment in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# --- processes ------------------------------------------------------------------------


@dataclass
class Peer:
    """One started server: its name, its port and the process we started."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    versions: str = ""
    scheme: str = "http"
    _known: dict[int, int] = field(default_factory=dict)

    def alive(self) -> bool:
        """Whether the started process still runs."""
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """The started process and its descendants (nginx: master and workers)."""
        tree = process_tree(self.process.pid)
        for pid in tree:
            started = start_time(pid)
            if started is not None:
                self._known.setdefault(pid, started)
        return tree

    def url(self, path: str) -> str:
        """``http://127.0.0.1:PORT/path`` (``https`` for a TLS port)."""
        return f"{self.scheme}://{HOST}:{self.port}{path}"

    def log_tail(self, lines: int = 5) -> str:
        """The end of the process's log, to explain a failure."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_problems(self) -> tuple[int, str]:
        """How many warning or error lines the process logged, and the first of them."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return 0, ""
        problems = [
            line
            for line in lines
            if _PROBLEM.search(line) and not any(known in line for known in _EXPECTED)
        ]
        return len(problems), problems[0].strip() if problems else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``timeout``; then any descendant left over, by PID."""
        self.pids()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, started in self._known.items():
            if pid != self.process.pid and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def start_peer(name: str, port: int, command: list[str], log: Path, cpu: int) -> Peer:
    """Start ``command`` pinned to ``cpu``, its output to ``log``."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["taskset", "-c", str(cpu), *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Peer(name=name, port=port, process=process, log=log)


def wait_until_answers(peer: Peer, path: str = "/small.txt", timeout: float = 20.0) -> None:
    """Poll ``GET path`` until it answers 200; fail early when the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    wrong_since: float | None = None
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise RuntimeError(
                f"{peer.name} exited with {peer.process.returncode}:\n{peer.log_tail()}"
            )
        try:
            connection = http.client.HTTPConnection(HOST, peer.port, timeout=2)
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
                wrong_since = wrong_since or time.monotonic()
                if time.monotonic() - wrong_since > 2.0:
                    break
            finally:
                connection.close()
        except OSError as error:
            last = str(error)
        time.sleep(0.05)
    raise RuntimeError(f"{peer.name} did not answer on port {peer.port}: {last}\n{peer.log_tail()}")


def version_of(command: list[str]) -> str:
    """The first line a ``-v`` style command prints (on stdout or stderr)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


# --- configurations -------------------------------------------------------------------


def write_content(root: Path) -> None:
    """The backend's files: ``small.txt`` (about 100 bytes), ``1m.bin`` (1 MiB of random
    bytes) and ``100k.json`` (about 100 KiB of an API's JSON)."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    (root / "small.txt").write_bytes(SMALL_BODY)
    (root / "1m.bin").write_bytes(os.urandom(LARGE_SIZE))
    (root / JSON_PATH.lstrip("/")).write_bytes(api_json(JSON_SIZE))


def api_json(size: int) -> bytes:
    """About ``size`` bytes of JSON as an API answers it: a list of records whose field
    names repeat and whose values vary (compresses about as well as real answers)."""
    records = []
    total = 2
    number = 0
    while total < size:
        number += 1
        record = json.dumps(
            {
                "id": number,
                "name": f"customer {number * 7919 % 100_003}",
                "email": f"user{number * 104_729 % 1_000_003}@example.com",
                "active": number % 3 != 0,
                "balance": round(number * 37.31 % 10_000, 2),
                "tags": ["retail", "priority"][: number % 3],
                "created_at": f"2026-{number % 12 + 1:02d}-{number % 28 + 1:02d}T10:00:00Z",
            }
        )
        records.append(record)
        total += len(record) + 1
    return ("[" + ",".join(records) + "]").encode()


def nginx_main(work: Path, http_body: str) -> str:
    """An nginx configuration: one worker, no access log, everything under ``work``, as
    many connections as the open-file limit allows (at most 40,000)."""
    limit = open_files_limit()
    worker_connections = min(40_000, limit - 256)
    return f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {limit};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{
    worker_connections {worker_connections};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
{http_body}
}}
"""


def backend_nginx_conf(work: Path, port: int, content: Path) -> str:
    """The origin server: static files, and ``POST /post`` read and answered 200."""
    return nginx_main(
        work,
        f"""
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    types {{
        text/plain txt;
        application/json json;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        root {content};
        client_max_body_size 16m;
        client_body_buffer_size 128k;
        location = {POST_PATH} {{
            return 200 "ok\\n";
        }}
    }}
""",
    )


def proxy_nginx_conf(
    work: Path, port: int, upstream_port: int, header_timeout: float | None = None
) -> str:
    """nginx as a reverse proxy: kept-alive upstream connections, default buffering.

    ``client_body_buffer_size`` holds a 64 KiB request body in memory rather than in a
    temporary file, as a proxy in front of uploads is usually configured.
    ``header_timeout`` (seconds) sets ``client_header_timeout``; None keeps nginx's 60 s.
    """
    header_directive = (
        f"client_header_timeout {round(header_timeout * 1000)}ms;"
        if header_timeout is not None
        else ""
    )
    return nginx_main(
        work,
        f"""
    upstream backend {{
        server {HOST}:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        client_max_body_size 16m;
        client_body_buffer_size 128k;
        {header_directive}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
""",
    )


def haproxy_conf(port: int, upstream_port: int) -> str:
    """haproxy in HTTP mode, one thread, server connections shared between clients, as
    many connections as the open-file limit allows (at most 30,000)."""
    maxconn = min(30_000, (open_files_limit() - 256) // 2)
    return f"""
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-request 30s
    timeout http-keep-alive 120s

frontend proxy
    bind {HOST}:{port}
    maxconn {maxconn}
    default_backend origin

backend origin
    server origin {HOST}:{upstream_port}
"""


# --- the set of peers -----------------------------------------------------------------


def start_backend(work: Path, cpu: int) -> Peer:
    """nginx serving the static files, pinned to ``cpu``."""
    # nginx's workers run as an unprivileged user: they must reach the files.
    work.chmod(0o755)
    content = work / "content"
    write_content(content)
    return start_nginx(
        "direct", work / "backend", lambda d, port: backend_nginx_conf(d, port, content), cpu
    )


class Upstream(Protocol):
    """What a proxy in front of a server needs of it: the port it listens on, on HOST
    (a :class:`Peer`, or a container's published or host-network port)."""

    @property
    def port(self) -> int: ...


def start_nginx_proxy(
    work: Path, upstream: Upstream, cpu: int, header_timeout: float | None = None
) -> Peer:
    """nginx as a reverse proxy in front of ``upstream`` (``client_header_timeout`` set to
    ``header_timeout`` seconds when given)."""
    return start_nginx(
        "nginx",
        work / "nginx",
        lambda d, port: proxy_nginx_conf(d, port, upstream.port, header_timeout),
        cpu,
    )


def start_nginx(name: str, nginx_dir: Path, config: Callable[[Path, int], str], cpu: int) -> Peer:
    """An nginx in ``nginx_dir`` with the configuration ``config(dir, port)``."""
    nginx_dir.mkdir()
    port = free_port()
    conf = nginx_dir / "nginx.conf"
    conf.write_text(config(nginx_dir, port))
    command = ["/usr/sbin/nginx", "-p", str(nginx_dir), "-e", str(nginx_dir / "error.log")]
    peer = start_peer(name, port, [*command, "-c", str(conf)], nginx_dir / "error.log", cpu)
    peer.versions = version_of(["/usr/sbin/nginx", "-v"])
    return peer


def start_haproxy(work: Path, upstream: Peer, cpu: int) -> Peer:
    """haproxy in the foreground (``-db``), one process, in front of ``upstream``."""
    haproxy_dir = work / "haproxy"
    haproxy_dir.mkdir()
    port = free_port()
    conf = haproxy_dir / "haproxy.cfg"
    conf.write_text(haproxy_conf(port, upstream.port))
    command = ["/usr/sbin/haproxy", "-db", "-f", str(conf)]
    peer = start_peer("haproxy", port, command, haproxy_dir / "haproxy.log", cpu)
    peer.versions = version_of(["/usr/sbin/haproxy", "-v"])
    return peer


def start_wunderproxy(
    work: Path,
    upstream: Peer,
    cpu: int,
    access_log: bool = False,
    extra: Sequence[str] = (),
    checkout: Path | None = None,
) -> Peer:
    """wunderproxy's real proxy (``benchmarks/proxy_only.py``) in front of ``upstream``;
    with ``access_log``, it writes one (common format) line per request to a file.

    ``extra`` are more options of ``proxy_only.py`` (``--header-timeout 5``, say). They
    come last, so that one given twice wins: ``--api HOST:PORT`` replaces port 0.
    ``checkout``: the wunderproxy of another working tree (an earlier commit, to compare
    before and after in one run), named ``wunderproxy@base``.
    """
    name = "wunderproxy+log" if access_log else "wunderproxy"
    if checkout is not None:
        name = "wunderproxy@base"
    wunder_dir = work / name
    wunder_dir.mkdir()
    port = free_port()
    command = [
        sys.executable,
        str((checkout or ROOT) / "benchmarks" / "proxy_only.py"),
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"{HOST}:{upstream.port}",
        "--api",
        f"{HOST}:0",
    ]
    if access_log:
        command += ["--access-log", str(wunder_dir / "access.log")]
    command += extra
    peer = start_peer(name, port, command, wunder_dir / "wunderproxy.log", cpu)
    peer.versions = f"Python {sys.version.split()[0]}"
    return peer


PROXIES: dict[str, Callable[[Path, Peer, int], Peer]] = {
    "nginx": start_nginx_proxy,
    "haproxy": start_haproxy,
    "wunderproxy": start_wunderproxy,
    "wunderproxy+log": functools.partial(start_wunderproxy, access_log=True),
}
