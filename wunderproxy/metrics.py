"""``GET /metrics``: the proxy's figures in Prometheus's text format.

Nothing is counted twice: a custom collector reads :class:`~wunderproxy.state.ProxyState`
(and its :class:`~wunderproxy.traffic.Traffic`) when Prometheus scrapes, so the request path
pays nothing for it. prometheus-client writes the text format and adds the usual
``process_*`` and ``python_*`` figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from wunderproxy.state import TIMEOUT_KINDS, ProxyState

# The format generate_latest writes, as every Prometheus version reads it (newer clients
# announce 1.0.0, which older servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProxyCollector(Collector):
    """Turns the proxy's state into metric families at scrape time."""

    def __init__(self, state: ProxyState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        totals = state.traffic.totals()

        requests = CounterMetricFamily(
            "wunderproxy_requests",
            "Requests answered, by the revision that answered and the status code "
            '(revision "-": answered by the proxy itself, with no container deployed or to a '
            "request it could not read; code 499: the client left before an answer).",
            labels=("revision", "code"),
        )
        duration = HistogramMetricFamily(
            "wunderproxy_request_duration_seconds",
            "Time from a request's head arriving to the end of its answer.",
            labels=("revision",),
        )
        received = CounterMetricFamily(
            "wunderproxy_received_bytes",
            "Bytes of requests read from clients (heads and bodies).",
            labels=("revision",),
        )
        sent = CounterMetricFamily(
            "wunderproxy_sent_bytes",
            "Bytes of answers sent to clients (heads and bodies).",
            labels=("revision",),
        )
        for revision, figures in totals.items():
            for code, n in sorted(figures.by_status.items()):
                requests.add_metric([revision, str(code)], n)
            duration.add_metric(
                [revision],
                [(_bound(le), n) for le, n in figures.latency.cumulative_prometheus()],
                figures.latency.total_seconds,
            )
            received.add_metric([revision], figures.bytes_in)
            sent.add_metric([revision], figures.bytes_out)
        yield from (requests, duration, received, sent)

        connections = GaugeMetricFamily(
            "wunderproxy_connections",
            "Client connections now, by state (open = active + idle; upgraded ones are "
            "also active; draining: to a container being drained).",
            labels=("state",),
        )
        for name, n in state.connection_counts().items():
            connections.add_metric([name], n)
        yield connections
        yield CounterMetricFamily(
            "wunderproxy_connections_refused",
            "Client connections closed at once with a 503 because --max-connections were open.",
            value=state.connections_refused,
        )

        timeouts = CounterMetricFamily(
            "wunderproxy_timeouts",
            "Timeouts by kind: header (a head not complete in --header-timeout), body (a "
            "body gap over --body-timeout), connect (--connect-timeout to the container), "
            "upstream (no byte of an answer in --upstream-timeout), send (a client that read "
            "nothing for --send-timeout).",
            labels=("kind",),
        )
        for kind in TIMEOUT_KINDS:
            timeouts.add_metric([kind], state.timeouts[kind])
        yield timeouts

        containers = GaugeMetricFamily(
            "wunderproxy_containers",
            "Containers of the app this wunderproxy runs, by state.",
            labels=("state",),
        )
        for name in ("launched", "serving", "draining"):
            containers.add_metric([name], sum(c.state == name for c in state.containers))
        yield containers

        deploys = CounterMetricFamily(
            "wunderproxy_deploys",
            "Deploys since start: switched (the proxy now routes to a new container) or "
            "failed (a launch that did not become healthy, or could not start).",
            labels=("result",),
        )
        for result, n in sorted(state.events.results.items()):
            deploys.add_metric([result], n)
        yield deploys

        current = InfoMetricFamily(
            "wunderproxy_current_revision",
            "The revision the proxy routes new requests to (absent: none deployed).",
        )
        if state.current is not None:
            current.add_metric(
                [],
                {
                    "revision": state.current.revision,
                    "hash": state.current.hash,
                    "container_id": state.current.container_id[:12],
                    "image": state.current.image,
                },
            )
        yield current

        yield GaugeMetricFamily(
            "wunderproxy_docker_up",
            "1 while the last call to the Docker engine succeeded, else 0.",
            value=0 if state.docker_error else 1,
        )

        fallback = state.fallback
        if fallback is not None:
            requests_fallen_back = CounterMetricFamily(
                "wunderproxy_fallback_requests",
                "Requests sent to a peer because no container here could take them "
                "(direction sent, peer: its URL), and requests peers sent here (direction "
                "received, peer: the sending instance).",
                labels=("direction", "peer"),
            )
            for direction, counts in (("sent", fallback.sent), ("received", fallback.received)):
                for peer, n in sorted(counts.items()):
                    requests_fallen_back.add_metric([direction, peer], n)
            yield requests_fallen_back
            yield CounterMetricFamily(
                "wunderproxy_fallback_unplaced_requests",
                "Requests that could have gone to a peer but no peer accepted them.",
                value=fallback.unplaced,
            )


def _bound(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(le)


class Metrics:
    """The registry ``/metrics`` renders: the proxy's figures and the process's."""

    def __init__(self, state: ProxyState) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ProxyCollector(state))
        ProcessCollector(registry=self._registry)
        PlatformCollector(registry=self._registry)
        GCCollector(registry=self._registry)

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self._registry)
