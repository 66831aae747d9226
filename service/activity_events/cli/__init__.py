"""The ``activity-client`` command line, split by command; entry point in :mod:`.app`."""
