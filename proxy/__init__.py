"""An async reverse proxy in front of Ollama for small machines.

Streaming relay, admission control (token bucket and concurrency gate), API keys and
Prometheus metrics. Start it with ``python -m proxy serve``.
"""

__version__ = "0.1.0"
