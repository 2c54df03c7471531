"""Prometheus metrics of a serving engine, named as vLLM and JetStream users know them.

Request metrics (time to first token, time per output token, inter-token latency, end-to-end
latency, queue time, token counters) are recorded on the engine thread as tokens arrive; gauges
(running, waiting, KV use, the partition in force) and the switching counters are brought up to
date from the engine's own state after every step and after every command the engine thread runs
(submissions, aborts, admin calls), so they never lag a state change. Each server has its own registry, exported
over HTTP on `--metrics-port`.
"""

from __future__ import annotations

import prometheus_client as prom

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
_TOKEN_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                  1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
  def __init__(self, model: str):
    self.registry = r = prom.CollectorRegistry()
    lab = ["model_name"]
    self.model = model
    g = lambda name, doc, extra=(): prom.Gauge(name, doc, lab + list(extra), registry=r)
    c = lambda name, doc, extra=(): prom.Counter(name, doc, lab + list(extra), registry=r)
    h = lambda name, doc, buckets: prom.Histogram(name, doc, lab, buckets=buckets, registry=r)
    self.running = g("flying_num_requests_running", "Sequences running on the devices")
    self.waiting = g("flying_num_requests_waiting", "Sequences waiting to be admitted")
    self.paused = g("flying_num_requests_paused", "Sequences paused by a switch")
    self.kv_usage = g("flying_kv_cache_usage_perc", "Share of KV pages in use (0-1)")
    self.partition = g("flying_partition_info", "1 for the partition in force", ["partition"])
    self.pending = g("flying_partition_pending_info",
                     "1 for the partition a drain in progress will switch to", ["partition"])
    self.pending_s = g("flying_partition_pending_seconds",
                       "How long the drain in progress has waited (0: none)")
    self.ttft = h("flying_time_to_first_token_seconds", "Arrival to first token", _LATENCY)
    self.tpot = h("flying_time_per_output_token_seconds",
                  "Mean time per output token after the first, per request", _TOKEN_LATENCY)
    self.itl = h("flying_inter_token_latency_seconds", "Time between two tokens of a sample",
                 _TOKEN_LATENCY)
    self.e2e = h("flying_e2e_request_latency_seconds", "Arrival to finish", _LATENCY)
    self.queue = h("flying_request_queue_time_seconds", "Arrival to first scheduled", _LATENCY)
    self.prompt_tokens = c("flying_prompt_tokens", "Prompt tokens of admitted requests")
    self.generation_tokens = c("flying_generation_tokens", "Tokens generated")
    self.requests = c("flying_request_success", "Finished sequences", ["finished_reason"])
    self.switches = c("flying_partition_switches", "Partition switches", ["reason", "strategy"])
    self.cutover = h("flying_partition_switch_cutover_seconds", "Host time of a switch's cutover",
                     (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0))
    self.partition_seconds = c("flying_partition_seconds", "Step time spent per partition",
                               ["partition"])
    self.switched = c("flying_switched_sequences",
                      "Sequences a switch kept, paused, recomputed or migrated", ["how"])
    # the prefix cache, counted in tokens as vLLM's prefix_cache_queries / prefix_cache_hits
    self.prefix_queries = c("flying_prefix_cache_queries",
                            "Prompt tokens looked up in the prefix cache")
    self.prefix_hits = c("flying_prefix_cache_hits", "Prompt tokens found in the prefix cache")
    self.prefix_hit_rate = g("flying_prefix_cache_hit_rate",
                             "Share of prompt tokens found in the prefix cache since start-up")
    self.prefix_pages = g("flying_prefix_cache_pages",
                          "KV pages named in the prefix cache (held by requests or parked)")
    self._prefix_seen = (0, 0)
    self._last_token: dict[int, float] = {}
    self._switches_seen = 0
    self._partition_seen: dict[str, float] = {}
    self._shown_partition: str | None = None
    self._shown_pending: str | None = None

  # from the engine loop ------------------------------------------------------------------------
  def on_submit(self, sub):
    self.prompt_tokens.labels(self.model).inc(len(sub.prompt_ids))

  def on_token(self, seq, now: float):
    last = self._last_token.get(seq.seq_id)
    if last is not None:
      self.itl.labels(self.model).observe(now - last)
    elif seq.first_token_time is not None:
      self.ttft.labels(self.model).observe(seq.first_token_time - seq.arrival_time)
    self._last_token[seq.seq_id] = now

  def on_finish(self, seq):
    m = self.model
    self._last_token.pop(seq.seq_id, None)
    n = len(seq.output_ids)
    self.generation_tokens.labels(m).inc(n)
    self.requests.labels(m, seq.finish_reason or "unknown").inc()
    if seq.finish_time is not None:
      self.e2e.labels(m).observe(seq.finish_time - seq.arrival_time)
      if n > 1 and seq.first_token_time is not None:
        self.tpot.labels(m).observe((seq.finish_time - seq.first_token_time) / (n - 1))
    if seq.scheduled_time is not None:
      self.queue.labels(m).observe(seq.scheduled_time - seq.arrival_time)

  def on_abort(self, seqs):
    """Sequences cancelled before they finished (client gone, deadline passed)."""
    for seq in seqs:
      self._last_token.pop(seq.seq_id, None)
      self.requests.labels(self.model, "abort").inc()

  def refresh(self, engine):
    m, sch = self.model, engine.scheduler
    self.running.labels(m).set(sch.num_running())
    self.waiting.labels(m).set(len(sch.waiting))
    self.paused.labels(m).set(len(engine.paused))
    self.kv_usage.labels(m).set(engine.kv_usage())
    name = engine.partition.name
    if name != self._shown_partition:
      if self._shown_partition is not None:
        self.partition.labels(m, self._shown_partition).set(0)
      self.partition.labels(m, name).set(1)
      self._shown_partition = name
    self._show_pending(engine)
    for rec in engine.switches[self._switches_seen:]:
      self.switches.labels(m, rec.reason, rec.strategy).inc()
      self.cutover.labels(m).observe(rec.cutover_s)
      for how in ("kept", "paused", "recomputed", "migrated"):
        self.switched.labels(m, how).inc(getattr(rec, how))
    self._switches_seen = len(engine.switches)
    self._show_prefix(engine.prefix_cache)
    for part, seconds in engine.seconds_per_partition.items():
      done = self._partition_seen.get(part, 0.0)
      if seconds > done:
        self.partition_seconds.labels(m, part).inc(seconds - done)
        self._partition_seen[part] = seconds

  def _show_prefix(self, cache):
    if cache is None:
      return
    m, (queried, hit) = self.model, self._prefix_seen
    if cache.queried_tokens > queried:
      self.prefix_queries.labels(m).inc(cache.queried_tokens - queried)
      self.prefix_hits.labels(m).inc(cache.hit_tokens - hit)
      self._prefix_seen = (cache.queried_tokens, cache.hit_tokens)
    self.prefix_hit_rate.labels(m).set(cache.hit_rate)
    self.prefix_pages.labels(m).set(cache.cached_pages())

  def _show_pending(self, engine):
    m, pending = self.model, engine.pending_switch
    name = pending.target.name if pending is not None else None
    if name != self._shown_pending:
      if self._shown_pending is not None:
        self.pending.labels(m, self._shown_pending).set(0)
      if name is not None:
        self.pending.labels(m, name).set(1)
      self._shown_pending = name
    self.pending_s.labels(m).set(engine.clock() - pending.requested_at if pending else 0.0)

  # export --------------------------------------------------------------------------------------
  def serve_http(self, port: int, host: str = "127.0.0.1"):
    """Expose /metrics on `host:port` (0: any free port) from a daemon thread; returns the HTTP
    server (its `server_port` is the port bound)."""
    server, _ = prom.start_http_server(port, addr=host, registry=self.registry)
    return server

  def text(self) -> str:
    return prom.generate_latest(self.registry).decode()
