"""`asr bench`: throughput, latency and memory figures."""
