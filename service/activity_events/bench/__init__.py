"""Benchmark tool for ActivityEvents servers (``activity-bench``).

Runs scenarios against any server address, or against a private Redis and
server it starts itself (``--spawn``), and prints a table, or with ``--json``
one JSON object per scenario run (plus one ``"run": "median"`` object per
scenario when ``--runs`` > 1). A progress bar is drawn on stderr when stderr is
a terminal.

Fields of every JSON object: ``scenario``, ``run``, ``target``, ``server``
("spawn", "echo" or "external"), the knobs (``count``, ``concurrency``,
``connections``, ``message_size``, ``deployments``, ``base``, plus ``batch``
for ingest and ``rate``/``duration`` for follow), ``events``, ``seconds``,
``events_per_s``, ``client_cpu_pct`` (and ``server_cpu_pct``/``redis_cpu_pct``
when the PIDs are known) and ``<role>_cpu_us_per_event``, ``uvloop``,
``server_startup_s``/``server_rss_mb_at_start``/``server_rss_mb`` (spawned
server: time to SERVING, RSS then and after the run), and ``error`` when the
run failed.

Per scenario:

- create: ``p50_ms p90_ms p99_ms p999_ms max_ms mean_ms`` (call latency),
  ``duplicates``, ``errors``, ``error_codes``.
- ingest: ``batch_p50_ms``... (per CreateEvents call), ``created``,
  ``duplicates``, ``conflicts``, ``invalid``, ``errors``.
- list, replay: ``streams``, ``per_stream_events_per_s``, ``complete`` (every
  stream got all ``count`` events), ``messages``, ``events_per_message``,
  ``first_message_ms``.
- follow: ``processes`` (follower processes), ``p50_ms``... = delivery
  latency XADD -> follower (wall clock at arrival minus the millisecond of
  the event's Redis entry id, from its cursor; 1 ms resolution; see
  `activity_events.bench.followers`), ``receive_p50_ms``... (from the server's receive
  time), ``send_p50_ms``... (from the writer's send time), ``followers``,
  ``followers_caught_up``, ``followers_ended``, ``followers_exhausted``,
  ``deliveries``, ``expected_deliveries``, ``drops``, ``repeats``,
  ``write_p50_ms``/``write_p99_ms``, ``write_errors``, ``target_rate``,
  ``redis_connections_max`` (CLIENT LIST, with Redis access),
  ``server_rss_mb_idle``/``server_rss_mb_max`` (spawned server: RSS when the
  scenario starts, and the most sampled while followers are connected).
- memory: ``bytes_per_event`` (MEMORY USAGE of the deployment's stream, dedup
  index and metadata keys / events), ``protobuf_bytes_per_event`` (the stored
  EventRequest, receive set), ``ratio_to_protobuf``,
  ``used_memory_per_event`` (INFO used_memory growth / events),
  ``events_bytes``/``ids_bytes``/``meta_bytes``, ``encodings``.
"""

from activity_events.bench.cli import main

__all__ = ["main"]
