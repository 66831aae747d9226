"""The subscribe benchmark runs end to end against a real server and counts right."""

from __future__ import annotations

from typing import Any

import grpc

from activity_events.bench.subscribe import measure
from activity_events.pb import activityevents_pb2 as pb
from activity_events.pb import activityevents_pb2_grpc as pb_grpc


async def test_subscribe_benchmark_acknowledges_every_event_once(
    server: Any, channel: grpc.aio.Channel
) -> None:
    result = await measure(
        f"127.0.0.1:{server.port}", events=3000, consumers=4, max_in_flight=200, deadline=60
    )
    assert result["events"] == 3000 and result["duplicates"] == 0
    assert result["acked_events_per_s"] > 0 and result["seconds"] >= result["received_seconds"]
    assert result["min_share"] > 0, "every consumer got a share"
    assert result["min_share"] + result["max_share"] <= 3000
    # It cleans up after itself: no subscription, no deployment left.
    subs = pb_grpc.SubscriptionsStub(channel)
    listed = await subs.ListSubscriptions(pb.ListSubscriptionsRequest(), timeout=10)
    assert not listed.subscriptions
    events = pb_grpc.ActivityEventsStub(channel)
    deployments = await events.ListDeployments(pb.ListDeploymentsRequest(), timeout=10)
    assert not deployments.deployments
