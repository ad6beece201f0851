"""Prometheus metrics for one server instance (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tlora_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("tlora_request_latency_seconds", "time to the full response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("tlora_time_to_first_token_seconds", "time to the first streamed text",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("tlora_tokens", "prompt and completion tokens", ["kind"], registry=r)
        self.routes = Counter("tlora_routes", "routing decisions by domain ('base' = abstained or forced base)",
                              ["domain", "how"], registry=r)
        self.abstentions = Counter("tlora_abstentions", "routed requests the router left to the base model",
                                   registry=r)
        self.in_flight = Gauge("tlora_requests_in_flight", "generation requests accepted and not finished",
                               registry=r)
        self.batch_size = Histogram("tlora_batch_size", "sequences decoded together, observed at every decoding step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.shed = Counter("tlora_requests_shed", "requests refused because the server was at its limit",
                            registry=r)
        self.reloads = Counter("tlora_reloads", "bundle versions swapped in without a restart", registry=r)
        self.reload_failures = Counter("tlora_reload_failures", "new bundle versions refused (the old one kept serving)",
                                       registry=r)
        self.versions_alive = Gauge("tlora_bundle_versions_alive",
                                    "bundle versions loaded: the live one plus old ones still finishing requests",
                                    registry=r)
        self.bundle_version = Gauge("tlora_bundle_version", "the bundle version new requests start on", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
