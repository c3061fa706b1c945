"""The front door: wunderproxy against nginx doing the same work, under wrk.

    python3 benchmarks/front.py [--seconds 10] [--json out.json] [--only SCENARIO ...]

Starts the nginx backend of ``benchmarks/suite.py`` and, in front of it, nginx and
wunderproxy (``benchmarks/proxy_only.py``) configured alike: a plain port and a TLS port
with the same certificate (ECDSA P-256 from a throwaway CA), compression of JSON, and
answers buffered for slow clients (nginx's default; ``--buffer-responses`` with 1 MiB in
memory). Everything is pinned as in the suite (servers on core 0, wrk on core 1); the
table of each scenario has req/s, MiB/s, latency, errors, CPU per request and the ratio to
nginx:

- ``tls-small-keepalive``: GET of about 100 bytes over TLS, 50 kept-alive connections;
- ``tls-new-connection``: the same with ``Connection: close``: a handshake per request;
- ``tls-1mib``: GET of 1 MiB over TLS (compared in MiB/s);
- ``json-100k-gzip``: GET of 100 KiB of JSON with ``Accept-Encoding: gzip``;
- ``json-100k-zstd`` and ``json-100k-br``: the same, zstd and br (nginx-light has
  neither: its row is the uncompressed answer, for scale);
- ``buffered-1mib``: GET of 1 MiB through the buffering of answers (MiB/s).

The cost of these features when off is measured by ``benchmarks/suite.py --baseline``
(the same proxy before and after), not here. Everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import (
    HOST,
    JSON_PATH,
    Peer,
    free_port,
    loads_library,
    nginx_main,
    raise_open_files,
    start_backend,
    start_nginx,
    start_wunderproxy,
    wait_until_answers,
)
from benchmarks.suite import (
    OPEN_FILES,
    SERVER_CPU,
    Scenario,
    header,
    log_problems,
    logs_report,
    machine_facts,
    parsed,
    run_options,
    run_scenario,
    scenario_table,
    stop_on_sigterm,
)

# Bytes of an answer held in memory before a file: wunderproxy's --buffer-memory default,
# and as many of nginx's proxy_buffers.
BUFFER_MEMORY = 1024 * 1024
# nginx's gzip level: the one wunderproxy uses, so that both do the same work.
GZIP_LEVEL = 5


@dataclasses.dataclass(frozen=True)
class FrontScenario:
    """A scenario of the suite, run against the TLS ports (``tls``) or the plain ones."""

    scenario: Scenario
    tls: bool = False


SCENARIOS = {
    front.scenario.name: front
    for front in (
        FrontScenario(Scenario("tls-small-keepalive", "/small.txt", 50), tls=True),
        FrontScenario(
            Scenario("tls-new-connection", "/small.txt", 50, close_connections=True), tls=True
        ),
        FrontScenario(Scenario("tls-1mib", "/1m.bin", 50, compare_mib=True), tls=True),
        *(
            FrontScenario(
                Scenario(f"json-100k-{name}", JSON_PATH, 50, headers=(f"Accept-Encoding: {name}",))
            )
            for name in ("gzip", "zstd", "br")
        ),
        FrontScenario(Scenario("buffered-1mib", "/1m.bin", 50, compare_mib=True)),
    )
}


def certificate(work: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its chain after it) and its key, from a new CA."""
    leaf = trustme.CA().issue_cert(HOST, "localhost")
    cert, key = work / "cert.pem", work / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def front_nginx_conf(
    work: Path, port: int, tls_port: int, upstream_port: int, cert: Path, key: Path
) -> str:
    """nginx as the front door: plain and TLS ports, gzip of text and JSON at
    GZIP_LEVEL, answers buffered (BUFFER_MEMORY in memory, then a temporary file)."""
    return nginx_main(
        work,
        f"""
    upstream backend {{
        server {HOST}:{upstream_port};
        keepalive 64;
    }}
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:tls:10m;
    ssl_session_tickets on;
    gzip on;
    gzip_comp_level {GZIP_LEVEL};
    gzip_min_length 1024;
    gzip_proxied any;
    gzip_vary on;
    gzip_types text/plain application/json application/javascript image/svg+xml;
    proxy_buffering on;
    proxy_buffers {BUFFER_MEMORY // 8192} 8k;
    server {{
        listen {HOST}:{port} backlog=4096;
        listen {HOST}:{tls_port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
""",
    )


@contextmanager
def running_front(work: Path) -> Iterator[dict[bool, dict[str, Peer]]]:
    """The backend, nginx and wunderproxy, answering; per ``tls``: the targets to measure
    (the backend, always plain, first as the reference)."""
    started: list[Peer] = []
    cert, key = certificate(work)
    try:
        backend = start_backend(work, SERVER_CPU)
        started.append(backend)
        wait_until_answers(backend)
        nginx_tls_port = free_port()
        nginx = start_nginx(
            "nginx",
            work / "nginx",
            lambda d, port: front_nginx_conf(d, port, nginx_tls_port, backend.port, cert, key),
            SERVER_CPU,
        )
        started.append(nginx)
        wunder_tls_port = free_port()
        options = ["--proxy-tls", f"{HOST}:{wunder_tls_port}", "--tls-cert", str(cert)]
        options += ["--tls-key", str(key), "--compress", "--buffer-responses"]
        options += ["--buffer-memory", str(BUFFER_MEMORY)]
        wunderproxy = start_wunderproxy(work, backend, SERVER_CPU, extra=options)
        started.append(wunderproxy)
        for peer in (nginx, wunderproxy):
            wait_until_answers(peer)
        yield {
            False: {"direct": backend, "nginx": nginx, "wunderproxy": wunderproxy},
            True: {
                "direct": backend,
                "nginx": dataclasses.replace(nginx, port=nginx_tls_port, scheme="https"),
                "wunderproxy": dataclasses.replace(
                    wunderproxy, port=wunder_tls_port, scheme="https"
                ),
            },
        }
    finally:
        for peer in reversed(started):
            peer.stop()


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = run_options(__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run only these")
    return parsed(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    chosen = args.only or list(SCENARIOS)
    open_files = raise_open_files(OPEN_FILES)
    started = time.monotonic()
    figures: dict[str, Any] = {"scenarios": {}}
    with (
        tempfile.TemporaryDirectory(prefix="wunderproxy-front-") as work_dir,
        running_front(Path(work_dir)) as targets,
    ):
        work = Path(work_dir)
        plain = targets[False]
        facts = machine_facts() | {
            "open_files_limit": open_files,
            "nginx": plain["nginx"].versions,
            "wunderproxy_uvloop": loads_library(plain["wunderproxy"].process.pid, "uvloop"),
        }
        figures["machine"] = facts
        print(header(facts, args.seconds, args.warmup), flush=True)
        for name in chosen:
            front = SCENARIOS[name]
            peers = targets[front.tls]
            results = run_scenario(front.scenario, peers, work, args.seconds, args.warmup)
            figures["scenarios"][name] = {t: m.as_dict() for t, m in results.items()}
            over = "TLS (direct: plain)" if front.tls else "plain HTTP"
            print(f"\n{scenario_table(front.scenario, results)}\n({over})", flush=True)
        figures["logs"] = log_problems(targets[False])
        print(f"\n{logs_report(figures['logs'])}", flush=True)
    figures["elapsed_seconds"] = time.monotonic() - started
    print(f"\ntotal {figures['elapsed_seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
