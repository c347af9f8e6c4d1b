"""`asr serve`: the websocket front door on Ray Serve, the Vosk protocol and a client."""
