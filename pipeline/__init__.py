"""Wiring and modes on Ray: streaming actors, batch transcription, cluster jobs, CLI."""
