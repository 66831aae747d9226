"""Benchmark tool for ActivityEvents servers (``activity-bench``).

Runs scenarios against any server address, or against a private Redis and
server it starts itself (``--spawn``; ``--echo``: the in-memory echo server,
the client's ceiling; ``--naive``: a private Redis and the naive server of
`activity_events.bench.naive`), and prints a table, or with ``--json`` one
JSON object per scenario run (plus one ``"run": "median"`` object per
scenario when ``--runs`` > 1). A progress bar is drawn on stderr when stderr is
a terminal.

``--compare`` (create, ingest, list, replay) runs each scenario ``--runs``
times against echo, naive and the real server in turn, each started fresh
for its run (`activity_events.bench.compare`): one object per (server, run),
then one ``"run": "median"`` object per server, then one
``{"scenario": ..., "comparison": {...}}`` object whose fields are ``runs``,
``events_per_s`` (server -> median), ``ratio_to_echo`` and
``ratio_to_naive`` (the real server's median events/s over theirs), for
scenarios with call latency ``p99_ms`` (server -> median),
``p99_ratio_to_echo`` and ``p99_ratio_to_naive``, and
``server_cpu_us_per_event``/``redis_cpu_us_per_event`` (server -> median;
None where not measured). A ratio is None when a server's runs all failed.

Fields of every JSON object: ``scenario``, ``run``, ``target``, ``server``
("spawn", "echo", "naive" or "external"), the knobs (``count``,
``concurrency``, ``connections``, ``message_size``, ``deployments``,
``base``, plus ``batch`` for ingest, ``rate``/``duration``/``processes`` for
follow and ``duration``/``processes`` for overload), ``events``, ``seconds``,
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
- overload (`activity_events.bench.overload`; ``events``/``seconds``/
  ``events_per_s`` and the CPU fields are of the idle phase). Counts by code
  are dicts of grpc status name (or HTTP status) -> calls.

  - idle: ``writers``, ``idle_writes_per_s`` (CreateEvent answered OK per
    second by ``writers`` closed-loop callers), ``idle_write_p99_ms``,
    ``idle_write_errors`` (by code).
  - read storm: ``history_events`` (filled first, not measured),
    ``readers``, ``reader_client`` ("h2load" or "grpc"),
    ``storm_writes_per_s``/``storm_write_p99_ms``/``storm_write_errors``,
    ``storm_write_ratio`` (storm / idle writes per second), ``readers_ok``,
    ``readers_resource_exhausted``, ``readers_other`` (by code; all three
    from the server's grpc_server_handled_total), ``readers_running`` (not
    ended when the wait ran out), ``readers_seconds`` (readers' start to
    their end or the wait's), ``storm_<role>_cpu_pct``, ``health_checks`` and
    ``health_not_serving`` (Check calls, one per 200 ms, that did not answer
    SERVING within 2 s), ``rss_idle_mb`` (server RSS before the readers),
    ``rss_max_mb`` (sampled every 200 ms), ``rss_after_mb`` (10 s after the
    readers ended).
  - viewer storm: ``viewers``, ``viewers_open`` (answered 200),
    ``viewers_refused`` (by status), ``viewers_dropped`` (streams the server
    ended during the phase) and of them ``viewers_reset`` (told to reload),
    ``viewer_bytes``, ``followers``, ``followers_open``,
    ``followers_caught_up``, ``followers_ended`` (by code),
    ``viewer_writes_per_s``/``viewer_write_p99_ms``/``viewer_write_errors``,
    ``viewer_write_ratio`` (viewer-storm / idle writes per second),
    ``viewer_health_not_serving``, ``viewer_<role>_cpu_pct``,
    ``viewer_followers_cpu_pct`` (the follower processes),
    ``viewer_rss_max_mb``.
  - burst: ``burst``, ``burst_codes`` (by code; OK and RESOURCE_EXHAUSTED
    expected), ``burst_seconds``.
"""

from activity_events.bench.cli import main

__all__ = ["main"]
