"""Helpers shared by the test suite: real processes, free ports and stream readers.

Everything here starts real things (``redis-server``, the ``activity-server``
console script) and tears them down by PID; nothing is mocked.
"""
