"""Constants of the domain that several layers share, each explained once."""

from __future__ import annotations

ALL = 0
"""Deployment id meaning "every deployment" (legacy ``Deployment{id: 0}``)."""

INT32_MAX = 2**31 - 1
"""Largest deployment and event id: the legacy contract's ids are int32."""

DEFAULT_PAGE = 100
"""Rows per page of a gRPC listing (deployments, dead letters) unless asked otherwise."""

MAX_PAGE = 1000
"""Largest page a gRPC listing answers."""

MAX_RESPONSE_BYTES = 1 << 20
"""Largest message a stream assembles (WatchEvents, Subscribe), well under gRPC's
default 4 MiB client limit; a stream's ``stream_buffer_bytes`` may lower it."""
