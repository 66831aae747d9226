"""Assembly of the server process: settings (environment and Consul), the
embedded Redis and the lifecycle."""
