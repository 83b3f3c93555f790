"""
An OpenAI-compatible HTTP server for a trained model, with a web chat page.

    python -m nanosft.serve --ckpt runs/latest [--quantize int8]      (make serve)   then open http://127.0.0.1:8000/

    POST /v1/chat/completions   OpenAI's chat completions, streamed (server-sent events) or whole
    GET  /v1/models[/<id>]      the one model served
    GET  /health                {"status": "ok", "active", "waiting", "free_slots"}
    GET  /                      the chat page (chat.html beside this file: plain HTML and JS)

Any OpenAI client talks to it:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").
Requests are decoded together by engine.py (continuous batching: one forward per step for all
active conversations); api.py checks each request and writes the replies' JSON. This file is the
HTTP around them, on Python's standard library: one thread per connection, which waits on its
request's queue of tokens while the engine's thread does the work. The server needs nothing that a
framework would add (routing is a handful of paths; streaming is writing lines), so it adds no dependency.

Safe by default: it listens on 127.0.0.1 only (--host 0.0.0.0 to open it, better with --api-key);
a body must be application/json (which no web page can send to another site unasked), bodies over
--max-body bytes are refused unread, max_tokens above --max-tokens is refused, a prompt must fit
the context, a full waiting queue answers 429, an idle connection is closed after a minute; a
client that goes away mid-reply frees its slot at the next step.
"""

import argparse
import hmac
import json
import os
import queue
import select
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from nanosft.api import ApiError, TextStream, chunk, completion, new_id, parse_chat_request, usage
from nanosft.checkpoint import describe_path, load_model
from nanosft.engine import Engine, Request
from nanosft.quantize import QUANTIZE, quantize_model
from nanosft.template import ChatTemplate

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class Server(ThreadingHTTPServer):
    """The HTTP server and what its handlers share: the engine, the template, the limits."""
    daemon_threads = True  # a connection's thread does not keep the process alive
    request_queue_size = 256  # connections waiting to be accepted (the default 5 resets a burst of clients)

    def __init__(self, model, tok, *, host="127.0.0.1", port=8000, slots=16, context=0, model_id="nanosft",
                 api_key=None, max_tokens=0, max_body=1 << 20, max_waiting=1024, stream_interval=0.02, quiet=False):
        """context, max_tokens 0: the model's context (at most 8192), and all of it but one token."""
        self.template = ChatTemplate(tok)
        self.engine = Engine(model, slots, context or min(model.cfg.max_seq_len, 8192), self.template.stop_ids,
                             tok.vocab_size, max_waiting).start()
        self.model_id, self.api_key, self.quiet = model_id, api_key, quiet
        self.max_tokens = min(max_tokens or self.engine.max_len, self.engine.max_len - 1)
        self.max_body, self.stream_interval = max_body, stream_interval
        with open(PAGE, encoding="utf-8") as f:
            self.page = f.read().encode("utf-8")
        super().__init__((host, port), Handler)

    def server_close(self):
        super().server_close()
        self.engine.stop()


class ClientGone(Exception):
    """The client closed the connection before the reply was done."""


PATHS = ("/", "/health", "/v1/models", "/v1/chat/completions")  # (and /v1/models/<id>)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive between whole replies; a stream ends its connection
    server_version = "nanosft"
    timeout = 60  # seconds a connection may sit idle, or stall a body or a read: then it is closed

    # ---- routing

    def do_GET(self):
        self.route({"/": self.chat_page, "/health": self.health, "/v1/models": self.models})

    do_HEAD = do_GET  # the same headers, no body (send() leaves it out)

    def do_POST(self):
        self.route({"/v1/chat/completions": self.chat_completions})

    def do_PUT(self):
        self.route({})

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def route(self, handlers):
        path = self.path.split("?", 1)[0]
        self.streaming = False  # set once a stream's headers are out: errors then go into the stream
        try:
            if path.startswith("/v1/models/") and self.command in ("GET", "HEAD"):
                handlers[path] = lambda: self.model(path.removeprefix("/v1/models/"))
            if path not in handlers:
                if path not in PATHS:
                    raise ApiError(404, f"no such endpoint: {path}", code="not_found")
                raise ApiError(405, f"{self.command} {path} is not supported", code="method_not_allowed")
            if path.startswith("/v1/"):
                self.check_key()
            handlers[path]()
        except ApiError as e:  # the connection closes: a body it did not read would be taken for the next request
            self.send_json(e.status, e.body(), close=True)
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # a bug: the operator's log says where, the client gets an error, the server goes on
            sys.stderr.write(f"error serving {self.command} {path}: {type(e).__name__}: {e}\n")
            error = ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")
            if self.streaming:
                self.close_connection = True
                self.event(error.body())
            else:
                self.send_json(500, error.body(), close=True)

    def check_key(self):
        if not self.server.api_key:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.server.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    # ---- the endpoints

    def chat_page(self):
        self.send(200, self.server.page, "text/html; charset=utf-8")

    def health(self):
        active, waiting, free = self.server.engine.load()
        self.send_json(200, {"status": "ok", "active": active, "waiting": waiting, "free_slots": free,
                             "steps": self.server.engine.steps})

    def model_object(self):
        return {"id": self.server.model_id, "object": "model", "created": 0, "owned_by": "nanosft"}

    def models(self):
        self.send_json(200, {"object": "list", "data": [self.model_object()]})

    def model(self, model_id):
        if model_id != self.server.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist", code="model_not_found")
        self.send_json(200, self.model_object())

    def chat_completions(self):
        s = self.server
        if self.headers.get_content_type() != "application/json":  # (a web page cannot send that to another
            # site without asking first: no page the user visits can make this server work)
            raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
        params = parse_chat_request(self.read_body(), s.model_id, s.max_tokens)
        prompt = s.template.render_prompt(params["messages"])
        room = s.engine.max_len - len(prompt)
        if room < 1:
            raise ApiError(400, f"the conversation is {len(prompt)} tokens; this server's context is {s.engine.max_len} "
                           "(the model's, or --context) and the reply needs at least one more", param="messages",
                           code="context_length_exceeded")
        request = Request(prompt, min(params["max_tokens"], room), params["temperature"], params["top_k"],
                          params["top_p"], params["seed"], params["ignore_eos"])
        try:
            s.engine.submit(request)
        except queue.Full as e:
            raise ApiError(429, f"the server is busy ({e}); try again later", code="too_many_requests") from None
        try:
            (self.stream if params["stream"] else self.whole)(request, TextStream(s.template.tok, params["stop"]), params)
        finally:
            request.cancel()  # (a no-op once the engine is done with it)

    def replies(self, request, text):
        """-> (text, None) for each piece of the reply as it becomes sendable, with all the tokens that
        arrived since the last piece; finally ("", finish_reason). At most one piece per
        --stream-interval: each costs a wake-up, a JSON object and a write here and as much in the
        client, which with many streams would take the CPU time the model needs (50 pieces a second
        still reads as a stream). A client that went away ends it (ClientGone)."""
        last = 0.0
        while True:
            wait = last + self.server.stream_interval - time.monotonic()
            if wait > 0:
                request.finished.wait(wait)  # (the reply's end is sent at once)
            if self.client_gone():
                raise ClientGone()
            events, piece = [self.next_event(request)], ""
            while not request.events.empty():
                events.append(request.events.get_nowait())
            for kind, value in events:
                if kind == "error":
                    raise ApiError(500, f"the model failed: {value}", kind="server_error")
                if kind == "done":
                    yield piece + text.flush(), None
                    yield "", value
                    return
                piece += text.push(value)
                if text.done:  # a stop string: the rest of the reply is not wanted
                    yield piece, None
                    yield "", "stop"
                    return
            yield piece, None
            last = time.monotonic()

    def next_event(self, request):
        """The request's next event from the engine, checking every second that the client is still there."""
        while True:
            try:
                return request.events.get(timeout=1.0)
            except queue.Empty:
                if self.client_gone():
                    raise ClientGone() from None

    def whole(self, request, text, params):
        pieces = list(self.replies(request, text))
        self.send_json(200, completion(new_id(), self.server.model_id, "".join(p for p, _ in pieces), pieces[-1][1],
                                       usage(len(request.prompt), len(text.ids))))

    def stream(self, request, text, params):
        cid, model_id = new_id(), self.server.model_id
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        self.end_headers()
        self.close_connection = self.streaming = True
        try:
            self.event(chunk(cid, model_id, {"role": "assistant", "content": ""}))
            for piece, finish in self.replies(request, text):
                if finish or piece:
                    self.event(chunk(cid, model_id, {"content": piece} if piece else {}, finish))
            if params["include_usage"]:
                self.event(chunk(cid, model_id, used=usage(len(request.prompt), len(text.ids))))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away, or stopped reading for `timeout` seconds
            raise ClientGone() from None
        except ApiError as e:  # after the headers: the error goes in the stream
            self.event(e.body())

    # ---- reading and writing

    def read_body(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        if not (length.isascii() and length.isdigit() and len(length) <= 15):
            raise ApiError(400, f"Content-Length {length[:20]!r} is not a number of bytes", code="bad_content_length")
        if int(length) > self.server.max_body:
            raise ApiError(413, f"the request body is {int(length)} bytes; this server takes at most {self.server.max_body}",
                           code="body_too_large")
        return self.rfile.read(int(length))

    def client_gone(self):
        """True when the client closed its side: its socket is readable with nothing to read (an end
        of file), where a client still there has nothing readable (or its next request). poll, not
        select: select fails on descriptors past 1023, which a busy server reaches."""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""  # readable: it returns at once
        except OSError:
            return True

    def event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def send_json(self, status, obj, close=False):
        self.send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json", close)

    def send(self, status, body, content_type, close=False):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if status == 405:
                self.send_header("Allow", "POST" if self.path.startswith("/v1/chat") else "GET, HEAD")
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away
            self.close_connection = True

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {fmt % args}\n")


def server_threads():
    """The model's threads: all cores but one, left to the connections' threads, which turn tokens
    into text and JSON and write them while the model computes the next step."""
    return max(1, (os.cpu_count() or 1) - 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanosft.serve", description="serve a model over OpenAI's chat API")
    p.add_argument("--ckpt", default="runs/latest", help="run directory or Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANOSFT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $NANOSFT_API_KEY, else none)")
    p.add_argument("--slots", type=int, default=16, help="conversations decoded at once (others wait their turn)")
    p.add_argument("--context", type=int, default=0, help="tokens a conversation may hold, prompt and reply: the "
                   "KV cache keeps this many per slot (0: the model's context, at most 8192)")
    p.add_argument("--max-tokens", type=int, default=0, help="the most tokens a request may ask for (0: the context)")
    p.add_argument("--max-waiting", type=int, default=1024, help="requests that may wait for a slot; more get 429")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes")
    p.add_argument("--stream-interval", type=float, default=0.02, help="seconds between a stream's chunks at "
                   "least; the tokens of the meantime go out together (0: a chunk per token)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE, help="serve the model with its weights quantized "
                   "(quantize.py); a directory written by python -m nanosft.quantize needs no flag")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: the run's folder name)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the model (0: all cores but one, which "
                   "the HTTP threads use)")
    p.add_argument("--quiet", action="store_true", help="no line per request")
    args = p.parse_args(argv)
    for name in ("slots", "max_body", "max_waiting"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.context < 0 or args.max_tokens < 0:
        p.error("--context and --max-tokens must not be negative (0: the model's context, at most 8192)")
    if not 0 <= args.port < 65536 or args.threads < 0 or not 0 <= args.stream_interval <= 1:
        p.error("--port must be in 0..65535, --threads not negative, --stream-interval in 0..1 seconds")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tok = load_model(args.ckpt, device=args.device)
        if args.quantize:  # (refused for a model already quantized, or int4 and a width not in groups of 32)
            quantize_model(model, args.quantize)
    except FileNotFoundError as e:
        sys.exit(f"No trained model at {args.ckpt} ({e}). Train one first: make train")
    except (OSError, ValueError, RuntimeError) as e:  # (RuntimeError: a --device torch cannot use)
        sys.exit(f"error: {e}")
    torch.set_num_threads(args.threads or server_threads())
    model_id = args.model_name or os.path.basename(os.path.realpath(args.ckpt))
    try:
        server = Server(model, tok, host=args.host, port=args.port, slots=args.slots, context=args.context,
                        model_id=model_id, api_key=args.api_key, max_tokens=args.max_tokens, max_body=args.max_body,
                        max_waiting=args.max_waiting, stream_interval=args.stream_interval, quiet=args.quiet)
    except OSError as e:  # port in use, address not on this machine, ...
        sys.exit(f"error: cannot listen on {args.host}:{args.port}: {e}")
    host, port = server.server_address[:2]
    print(f"serving {describe_path(args.ckpt)} as {model_id!r} at http://{host}:{port}/ "
          f"({args.slots} slots{', API key required' if args.api_key else ''}); Ctrl-C stops", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("warning: listening beyond this machine without --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
