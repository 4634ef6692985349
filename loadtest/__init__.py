"""Load generator, report, and the protocol-faithful fake Ollama used by tests and benchmarks."""
