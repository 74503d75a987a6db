"""PolicyService: text generation with continuous batching, a TGI-compatible HTTP API and checkpoint hot-swap."""
