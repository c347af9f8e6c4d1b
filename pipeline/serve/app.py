"""``asr serve``: the streaming pipeline behind a websocket, on Ray Serve, speaking the Vosk
protocol (``pipeline.serve.protocol``).

    client ─ws─► AsrIngress replica ─► StreamingPipeline session ─► stage actors
                 (websocket, JSON;      (chains, backpressure,      (shared, batched;
                  event loop)            recovery)                   started once)

On a Ray that ``asr serve`` starts, the one ingress replica listens on the port itself (Serve's
direct ingress, ``serve_cli.direct_ingress_environment``); on a cluster (``--address``) or with
``--replicas N``, clients reach the replicas through the Serve proxy on the port, which relays
every message and reply as a Ray call.

The driver (``asr serve``) starts one set of stage actors (``StageActors``) and deploys the
ingress with their handles, so ingress replicas only translate the protocol while
recognition (the batched acoustic model, per-stream state) stays in the shared stage
actors: the two scale separately. Routes: ``/`` (websocket; ``GET /``: the live-captions page), ``GET /healthz`` (200 once
the pipeline answers; for load balancers) and ``GET /stats`` (connections, per-actor
stream counts and memory).
"""


import asyncio
import functools
import importlib.resources
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.websockets import WebSocketDisconnect

from pipeline.config import AppConfig
from pipeline.serve.protocol import ChunkClock, CloseCode, Reply, VoskConnection, presented_token, token_accepted

app = FastAPI(title="asr serve", description="Streaming speech recognition over the Vosk websocket protocol")
#: What the page may load: itself, its inline script and style, its worklet (a blob: URL) and this
#: server's websocket; nothing from another origin.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline' blob:; style-src 'unsafe-inline'; "
               "connect-src 'self' ws: wss:; media-src 'self' blob:; img-src 'self' data:")
#: How often a connection waiting for its next frame looks whether the server is draining.
DRAIN_POLL_S = 0.2


@ray.remote(num_cpus=0)
class DrainFlag:
    """Set once by ``asr serve`` on SIGTERM / Ctrl-C; every ingress replica waits on it (one
    pending call each), so all of them drain, however many there are."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    async def wait(self) -> bool:
        await self._event.wait()
        return True

    async def set(self) -> None:
        self._event.set()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class AsrIngress:
    """The front door: one websocket connection = one ``VoskConnection`` over a session that
    attaches to the shared stage actors. Audio frames are handled on the event loop
    (``_on_audio``); the calls that block (config, eof, reset, a disconnect, a push that
    must wait) run on a thread of a pool sized for ``max_streams`` connections. A connection
    beyond ``max_streams`` is refused."""

    def __init__(self, config: AppConfig, actors: Any, max_streams: int, front_door: dict[str, Any] | None = None,
                 token_digest: str | None = None, idle_timeout_s: float = 0.0, drain_flag: Any = None) -> None:
        from pipeline.streaming.session import StreamingPipeline

        self.front_door = front_door or {}  # how clients reach this replica ("direct", "proxy_port"), for /stats
        self._bind_internal_grpc_to_node_ip()
        if self.front_door.get("direct"):
            self._set_up_direct_listener()
        self.pipe = StreamingPipeline(config, actors=actors)
        self.actors = actors
        self.max_streams = max_streams
        self.connections = 0
        self.refused = 0
        self.unauthorized = 0
        self.idle_closed = 0
        self.idle_timeout_s = idle_timeout_s  # a connection that sends no audio this long is closed (0: never)
        self._token_digest = token_digest  # SHA-256 of the access token (None: none needed)
        self._page = importlib.resources.files("pipeline.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        self.draining = False  # set when asr serve stops: /healthz says 503, connections get their final and 1001
        if drain_flag is not None:
            threading.Thread(target=self._wait_for_drain, args=(drain_flag,), daemon=True, name="asr-drain").start()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_streams + 4, thread_name_prefix="asr-conn")
        # The clock predicts model chunks from the audio's duration; with utterances cut by voice
        # activity (each starts its chunks afresh, pauses held back) it cannot, so every reply waits.
        endpointed = config.vad.enabled and config.streaming.endpoint_silence_ms > 0
        self._clock = None if endpointed else functools.partial(
            ChunkClock, actors.chunk_ms, actors.lookahead_ms, actors.frame_ms, actors.feature_span_ms, config.streaming.ingest_chunk_ms)

    def _wait_for_drain(self, drain_flag: Any) -> None:
        try:
            ray.get(drain_flag.wait.remote())
        except Exception:  # the flag's actor is gone: the server is being taken down anyway
            pass
        self.draining = True

    @app.get("/")
    def page(self) -> HTMLResponse:
        """The live-captions page (``pipeline/serve/static/index.html``): the microphone or a file,
        streamed over this server's websocket. Everything it uses comes from here (the policy
        header forbids anything else)."""
        return HTMLResponse(self._page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz(self) -> JSONResponse:
        """200 once the pipeline is up (this replica exists only then); 503 from the moment the
        server starts shutting down, so a load balancer sends no new clients."""
        body = {"status": "draining" if self.draining else "ok", "connections": self.connections, "max_streams": self.max_streams}
        return JSONResponse(body, status_code=503 if self.draining else 200)

    @app.get("/stats")
    def stats(self) -> JSONResponse:
        """Connections, streams held by each stage actor, and each process's memory."""
        from pipeline.streaming.actors import process_rss_mb

        return JSONResponse({
            "connections": self.connections, "max_streams": self.max_streams, "refused": self.refused,
            "unauthorized": self.unauthorized, "idle_closed": self.idle_closed, **self.front_door,
            "open_streams": self.pipe.open_streams(), "stage_streams": self.actors.stream_counts(),
            "actor_rss_mb": {**self.actors.rss_mb(), "ingress": round(process_rss_mb(), 1)},
            "recoveries": self.pipe.stats.recoveries, "lost_streams": self.pipe.stats.lost_streams,
        })

    @app.websocket("/")
    async def recognize(self, websocket: WebSocket) -> None:
        await websocket.accept()
        if not token_accepted(self._token_digest, presented_token(websocket.headers, websocket.query_params)):
            with self._lock:
                self.unauthorized += 1
            await self._send(websocket, Reply({"error": "unauthorized: this server needs its access token, as "
                                                        "'Authorization: Bearer TOKEN' or '?token=TOKEN'"}, CloseCode.POLICY))
            return
        if self.draining:
            await self._send(websocket, Reply({"error": "server shutting down"}, CloseCode.GOING_AWAY))
            return
        with self._lock:
            admitted = self.connections < self.max_streams
            self.connections += admitted
            self.refused += not admitted
        if not admitted:
            await self._send(websocket, Reply({"error": f"server at capacity: {self.max_streams} connections "
                                                   "(streaming.max_streams); try again later"}, CloseCode.TRY_AGAIN_LATER))
            return
        connection = VoskConnection(self.pipe, self._clock)
        loop = asyncio.get_running_loop()
        last_audio = time.monotonic()
        receiving: asyncio.Future | None = None
        try:
            while True:
                if self.draining:  # the server is stopping: the final of what was sent, then 1001
                    if receiving is not None:
                        receiving.cancel()
                    await self._send(websocket, await loop.run_in_executor(self._pool, connection.on_shutdown))
                    break
                if receiving is None:
                    receiving = asyncio.ensure_future(websocket.receive())
                done, _ = await asyncio.wait({receiving}, timeout=min(DRAIN_POLL_S, self._idle_left(last_audio) or DRAIN_POLL_S))
                if not done:
                    if self._idle_left(last_audio) == 0:
                        receiving.cancel()
                        with self._lock:
                            self.idle_closed += 1
                        await self._send(websocket, Reply({"error": f"no audio for {self.idle_timeout_s:g} s (--idle-timeout-s): "
                                                                    "closing this connection"}, CloseCode.POLICY))
                        break
                    continue
                message, receiving = receiving.result(), None
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    last_audio = time.monotonic()
                    reply = await self._on_audio(connection, message["bytes"], loop)
                else:
                    reply = await loop.run_in_executor(self._pool, connection.on_text, message.get("text") or "")
                await self._send(websocket, reply)
                if reply.close_code is not None:
                    break
        except (WebSocketDisconnect, RuntimeError):  # the client went away mid-reply
            pass
        finally:
            if receiving is not None and not receiving.done():
                receiving.cancel()
            # Serve cancels this handler once it sees the client's side of the close (direct
            # ingress does, as soon as the close handshake ends): the stream's state is freed on
            # a pool thread whatever happens here, and the connection always stops counting.
            try:
                await asyncio.shield(loop.run_in_executor(self._pool, connection.on_disconnect))
            finally:
                with self._lock:
                    self.connections -= 1

    def _idle_left(self, last_audio: float) -> float | None:
        """Seconds the connection may still go without audio (None: no limit)."""
        if self.idle_timeout_s <= 0:
            return None
        return max(0.0, last_audio + self.idle_timeout_s - time.monotonic())

    async def _on_audio(self, connection: VoskConnection, data: bytes, loop: asyncio.AbstractEventLoop) -> Reply:
        """A binary frame, on the event loop: the push returns at once, and a reply that waits
        for the stages awaits the session's completion future, so no thread sits blocked per
        frame. A push that would wait (backpressure, restarted actors, a failed push to
        recover) runs on a pool thread instead, as does a wait past the recovery timeout."""
        if not self.pipe.push_is_quick(connection.stream_id):
            return await loop.run_in_executor(self._pool, connection.on_audio, data)
        wait = connection.accept_audio(data)
        if isinstance(wait, Reply):
            return wait
        stream_id = connection.stream_id
        try:
            if wait:
                await asyncio.wait_for(asyncio.wrap_future(self.pipe.completion(stream_id)), self.pipe.streaming.recovery_timeout_s)
            results: Any = self.pipe.results_now(stream_id)
        except TimeoutError:  # a stage never answered: the blocking path's timeout decides
            results = await loop.run_in_executor(self._pool, connection.stream_results, True)
        except Exception as exc:
            results = exc
        return connection.audio_reply(results)

    @staticmethod
    async def _send(websocket: WebSocket, reply: Reply) -> None:
        # (a method, not a module function: Serve pickles the ingress class by value)
        text = reply.text()
        if text is not None:
            await websocket.send_text(text)
        if reply.close_code is not None:
            await websocket.close(code=reply.close_code)

    @staticmethod  # (a method, not a module function: Serve pickles the ingress class by value)
    def _bind_internal_grpc_to_node_ip() -> None:
        """Ray Serve's replica starts its inter-deployment gRPC server on ``[::]:0``, every
        interface (``ray/serve/_private/replica.py``, Ray 2.60; no option or variable sets that
        host, and the server starts after this constructor). Every other Ray socket of a node
        binds the node's IP address (127.0.0.1 on a Ray that ``asr serve`` starts), so this one
        is bound there too, the address Ray itself gives this replica's node."""
        import ray.serve._private.replica as replica_module

        original = replica_module.add_port_to_grpc_server
        if getattr(original, "node_ip", None):
            return
        node_ip = ray.util.get_node_ip_address()
        host = f"[{node_ip}]" if ":" in node_ip else node_ip

        def on_node_ip(server: Any, address: str) -> int:
            if address.startswith("[::]:"):
                address = f"{host}:{address[len('[::]:'):]}"
            return original(server, address)

        on_node_ip.node_ip = node_ip  # type: ignore[attr-defined]
        replica_module.add_port_to_grpc_server = on_node_ip

    @staticmethod  # (a method, not a module function: Serve pickles the ingress class by value)
    def _set_up_direct_listener() -> None:
        """Two changes to the listener Serve's direct ingress starts in this replica process (the
        replica's constructor runs before it starts), and only to it:

        - SO_REUSEADDR, as Serve's proxy sets it: Serve binds this port without it, so a server
          restarted within a minute of serving could not bind: the connections it closed (the
          server closes after eof) hold the port in TIME_WAIT. A port another server is
          listening on still fails to bind.
        - No per-message deflate: PCM hardly compresses, and zlib on every frame and reply cost
          the server and its clients CPU the stages then lacked (24 clients: reply p95 129 and
          125 ms without it, 142 and 153 ms with it, alternating on one server). Clients that
          offer it (Vosk's, any ``websockets`` client) fall back to plain frames."""
        import socket

        from ray.serve._private import http_util, replica

        if getattr(replica.start_asgi_http_server, "set_up", False):
            return
        start = replica.start_asgi_http_server

        def reuse_address(sock: socket.socket) -> bool:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            return True

        async def start_set_up(*args: Any, **kwargs: Any) -> Any:
            kwargs["enable_so_reuseport"] = True  # -> http_util.set_socket_reuse_port, replaced below
            task, server = await start(*args, **kwargs)
            server.config.ws_per_message_deflate = False  # read for each new connection
            return task, server

        http_util.set_socket_reuse_port = reuse_address  # (this replica process runs no other listener)
        start_set_up.set_up = True  # type: ignore[attr-defined]
        replica.start_asgi_http_server = start_set_up
