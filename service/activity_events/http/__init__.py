"""The HTTP side port: metrics, probes and the activity page."""
