"""The HTTP server: the OpenAI API over the batching engine (app.py), its request checks (protocol.py),
limits (limits.py) and Prometheus metrics (metrics.py). Like the runtime, it needs no compiler."""
