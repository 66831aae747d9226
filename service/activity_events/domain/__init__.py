"""The domain model: events, cursors, limits and the errors the service raises on purpose."""
