"""Audio in: read and check files, chunk and resample streams, voice activity, endpointing."""
