"""`python -m integration_training.chat MODEL`: talk to a model or a run checkpoint, in the terminal or a web page.

MODEL resolves exactly as in `python -m integration_training.evaluate` (`models.resolve_model_path`): an HF hub id,
a local `save_pretrained` directory, a run checkpoint such as `results/X/checkpoints/rl/step_000010`, or
`offline:SmolLM2-135M-Instruct`; a LoRA run's mid-stage step directory (adapter only) loads its recorded base with
the adapter merged (`lora.load_adapter_step`). Prompts use the model's own chat template (`template.render_prompt`); tokens
come from the project's sampler (`rollout.stream`, the batch-1 sibling of `rollout.sample`: same `pick_tokens`,
same pre-allocated KV cache) and are shown as they are drawn. The KV cache is kept across turns: each reply
computes only the tokens after the longest prefix the cache already holds (exact; see `rollout.StreamCache`).

Terminal: `/clear` starts a new conversation, `/exit` (or Ctrl-D) quits, Ctrl-C stops the current reply.
`--prompt TEXT` answers once on stdout and exits. `--web` serves one self-contained page (chat_page.html) from
the standard library's HTTP server; see `serve`.

Tools (the calculator) do not exist yet. Their seam: `Reply.__iter__` is where a tool call would be detected in
the token stream, run, and its result fed back as prompt tokens before sampling resumes; it would reach the
terminal as a distinctly styled line and the page as its own server-sent event kind (`event: tool`) beside
`text`, so neither transport changes shape.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import socket
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from jinja2 import TemplateError

from integration_training.errors import UserError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
PAGE = Path(__file__).with_name("chat_page.html")
MAX_MESSAGE_CHARS = 8000  # one web message; the whole conversation is bounded by the model's context instead
MAX_BODY_BYTES = 1 << 20  # a web request body; larger ones are refused before they are read
QUEUE_POLL_SECONDS = 0.25  # how often a waiting web request checks its client is still there
STOP_WAIT_SECONDS = 10.0  # Ctrl-C on --web: how long open streams get to wind down
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class Sampling:
    temperature: float  # 0 = greedy
    top_k: int  # 0 = no top-k filter
    max_new_tokens: int


class IncrementalDecoder:
    """Token ids in, text pieces out, such that the pieces concatenate to the decoded whole.

    A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives, so text is held
    back while it ends in U+FFFD. Each step decodes only a window starting a few tokens back (`prefix`) and
    compares it with the same window without the new tokens, so leading-space handling of tokenizers that drop
    a first token's space (SentencePiece) cancels out and the cost per token stays constant.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(done) or text.endswith("\ufffd") or not text.startswith(done):
            return ""  # nothing new yet, or an unfinished character: wait for more tokens
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

    def flush(self) -> str:
        """What is still held back (an unfinished character at the very end shows as U+FFFD)."""
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :] if text.startswith(done) else ""


class Reply:
    """One streamed answer: iterate for text pieces; `token_ids` and `finished` tell how far it got."""

    def __init__(self, engine: ChatEngine, prompt: list[int]) -> None:
        self.engine = engine
        self.prompt = prompt
        self.token_ids: list[int] = []
        self.finished = False  # True iff the model ended the turn itself (a stop token, not the length limit)

    def __iter__(self) -> Iterator[str]:
        from integration_training.rollout import stream

        engine = self.engine
        tokens = stream(engine.model, self.prompt, engine.sampling.max_new_tokens, engine.sampling.temperature,
                        engine.sampling.top_k, engine.stops, engine.generator, engine.kv)
        decoder = IncrementalDecoder(engine.tokenizer)
        try:
            for token_id in tokens:
                self.token_ids.append(token_id)
                if token_id in engine.stops:
                    self.finished = True
                    break
                piece = decoder.push(token_id)
                if piece:
                    yield piece
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            tokens.close()  # a stopped reply ends the sampler now, not when garbage is collected


class ChatEngine:
    """One loaded model with its sampling settings and KV cache. One reply at a time (the web server queues)."""

    def __init__(self, model, tokenizer, stops: frozenset[int], sampling: Sampling, system: str | None, seed: int,
                 label: str) -> None:
        from integration_training.rollout import StreamCache

        assert not model.training, "chat samples; load the model in eval mode"
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.system = system
        self.seed = seed
        self.label = label
        self.stops = stops  # template.stop_token_ids: EOS and the template's end-of-turn token
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.kv = StreamCache()
        self.context = getattr(model.config, "max_position_embeddings", None)  # None: the config states no limit
        if self.context is not None and sampling.max_new_tokens >= self.context:
            raise UserError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the model's "
                            f"context of {self.context} tokens; lower it")

    def prompt_ids(self, turns: Sequence[dict[str, str]]) -> list[int]:
        """Render `turns` (user/assistant, ending with a user turn) with the system prompt; refuse what won't fit."""
        from integration_training.template import render_prompt

        if not turns or turns[-1]["role"] != "user":
            raise UserError("the conversation must end with a user message")
        if not turns[-1]["content"].strip():
            raise UserError("the message is empty; type something first")
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        try:
            ids = render_prompt(self.tokenizer, system + [dict(t) for t in turns])
        except TemplateError as error:  # a template that refuses a conversation (say, one without a system role)
            raise UserError(f"the model's chat template refused the conversation: {error}") from None
        if self.context is not None and len(ids) + self.sampling.max_new_tokens > self.context:
            raise UserError(f"the conversation is {len(ids)} tokens; with up to {self.sampling.max_new_tokens} new "
                            f"tokens it would exceed the model's context of {self.context}: start a new chat "
                            "(or shorten the message, or lower --max-new-tokens)")
        return ids

    def reply(self, prompt: list[int]) -> Reply:
        return Reply(self, prompt)

    def describe(self) -> dict:
        return {
            "model": self.label, "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "temperature": self.sampling.temperature, "top_k": self.sampling.top_k,
            "max_new_tokens": self.sampling.max_new_tokens, "seed": self.seed, "context": self.context,
            "system": self.system, "max_message_chars": MAX_MESSAGE_CHARS,
        }


# ---------------------------------------------------------------------------------------------------- loading


def check_flags(args: argparse.Namespace) -> None:
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = no top-k filter), got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompt is not None and args.web:
        raise UserError("--prompt answers once in the terminal and --web serves a page; pass one of them")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; pass the message to answer")
    if not args.web and (args.host is not None or args.port is not None):
        raise UserError("--host and --port only apply to --web; add --web or drop them")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")


def load_engine(args: argparse.Namespace) -> ChatEngine:
    """Model, tokenizer and device; what a user can get wrong here fails before the weights load."""
    from integration_training.evaluate import resolve_device
    from integration_training.models import load_model, load_tokenizer, resolve_model_path
    from integration_training.template import stop_token_ids

    from integration_training import lora

    device = resolve_device(args.device)
    if lora.holds_adapter_only(Path(args.model).expanduser()):
        # A mid-stage LoRA checkpoint (adapter + train state): its recorded base + this adapter, merged.
        path = str(Path(args.model).expanduser().resolve())
        tokenizer = load_tokenizer(path)
        stops = stop_token_ids(tokenizer)  # before the weights, as below
        model = lora.load_adapter_step(Path(path), args.dtype, device)
    else:
        path = resolve_model_path(args.model)
        local = Path(path)
        if local.is_dir() and not any((local / name).is_file() for name in WEIGHT_FILES):
            raise UserError(f"{args.model}: {local} has no weights ({' or '.join(WEIGHT_FILES[::2])}); point at a "
                            "save_pretrained directory or a run checkpoint step_NNNNNN directory")
        tokenizer = load_tokenizer(path)
        stops = stop_token_ids(tokenizer)  # also refuses a tokenizer without a usable chat template, before weights
        model = load_model(path, args.dtype, "sdpa", device, training=False).eval()
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    return ChatEngine(model, tokenizer, stops, sampling, args.system, args.seed, label=args.model)


def _settings_line(engine: ChatEngine) -> str:
    info = engine.describe()
    system = "the template's own" if info["system"] is None else repr(info["system"])
    return (f"chat: {info['model']} on {info['device']} ({info['dtype']}); temperature {info['temperature']}, "
            f"top-k {info['top_k']}, up to {info['max_new_tokens']} new tokens, seed {info['seed']}; "
            f"system prompt: {system}")


# ---------------------------------------------------------------------------------------------------- terminal


def answer_once(engine: ChatEngine, text: str) -> None:
    """`--prompt`: the reply on stdout as it streams, then a newline."""
    for piece in engine.reply(engine.prompt_ids([{"role": "user", "content": text}])):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def terminal_loop(engine: ChatEngine) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    print("/clear starts a new conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a reply.", file=sys.stderr)
    turns: list[dict[str, str]] = []
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
            continue
        command = line.strip()
        if command == "/exit":
            return
        if command == "/clear":
            turns = []
            print("(new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        candidate = turns + [{"role": "user", "content": line}]
        try:
            prompt = engine.prompt_ids(candidate)
        except UserError as error:
            print(f"({error})", file=sys.stderr)
            continue
        text = _stream_to_terminal(engine.reply(prompt))
        if text:
            # A stopped reply stays as far as it got: that is what the user saw and will answer to.
            turns = candidate + [{"role": "assistant", "content": text}]


def _stream_to_terminal(reply: Reply) -> str:
    pieces: list[str] = []
    stream = iter(reply)
    try:
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        if not reply.finished:
            print(f"\n(stopped at --max-new-tokens {reply.engine.sampling.max_new_tokens})", file=sys.stderr)
    except KeyboardInterrupt:
        stream.close()
        print("\n(stopped)", file=sys.stderr)
    print()
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------- web


class Queue:
    """Who may use the model: requests in arrival order; the first one holds the model, the others wait.

    A waiting request that leaves (its client went away) is removed at once, so nobody waits behind it.
    """

    def __init__(self) -> None:
        self._order: list[int] = []
        self._next = 0
        self._changed = threading.Condition()

    def join(self) -> int:
        with self._changed:
            ticket = self._next
            self._next += 1
            self._order.append(ticket)
            return ticket

    def ahead(self, ticket: int, timeout: float) -> int:
        """Requests ahead of `ticket` after waiting up to `timeout` for that to change (0 = it holds the model)."""
        with self._changed:
            position = self._order.index(ticket)
            if position > 0:
                self._changed.wait(timeout)
                position = self._order.index(ticket)
            return position

    def leave(self, ticket: int) -> None:
        with self._changed:
            self._order.remove(ticket)
            self._changed.notify_all()

    def __len__(self) -> int:
        with self._changed:
            return len(self._order)


@dataclass
class Served:
    """What the server has done, for /api/info: replies delivered whole, replies whose client left, tokens drawn."""

    delivered: int
    abandoned: int
    tokens: int

    def record(self, tokens: int, delivered: bool) -> None:
        self.tokens += tokens
        if delivered:
            self.delivered += 1
        else:
            self.abandoned += 1


class ClientGone(Exception):
    """The browser closed the connection (stop button, closed tab, a load-test client hanging up)."""


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True  # a backstop: Ctrl-C winds open streams down first (`stopping`), bounded in time
    request_queue_size = 128  # the listen backlog; the default 5 refuses bursts of browsers and load tests

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, ChatHandler)
        self.engine: ChatEngine | None = None  # set before serving starts: the port is taken before the model loads
        self.queue = Queue()
        self.served = Served(delivered=0, abandoned=0, tokens=0)
        # Set on Ctrl-C: open streams end at their next piece (as if their clients had left), so the process never
        # exits with a thread inside the model (interpreter shutdown under a running forward aborts).
        self.stopping = threading.Event()
        self.page = PAGE.read_bytes()


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    # HTTP/1.0: one request per connection, the stream ends when the connection does; a closed connection is
    # thus always the client leaving.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the stdlib's name)
        pass  # one line per request would bury the settings line; errors still reach the client

    def do_GET(self) -> None:  # noqa: N802  (the stdlib's name)
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.server.page)
        elif self.path == "/api/info":
            served = self.server.served
            self._send_json(HTTPStatus.OK, self.server.engine.describe() | {
                "queue": len(self.server.queue), "delivered": served.delivered, "abandoned": served.abandoned,
                "tokens": served.tokens})
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no page at {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/chat":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint at {self.path}"})
            return
        try:
            prompt = self.server.engine.prompt_ids(self._read_turns())
        except UserError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        try:
            self._stream_reply(prompt)
        except (ClientGone, ConnectionError):
            pass  # the model is already free again (the reply's generator closed on the way out)

    def _read_turns(self) -> list[dict[str, str]]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise UserError("the request needs a Content-Length header")
        if int(length) > MAX_BODY_BYTES:
            raise UserError(f"the request is {int(length)} bytes; at most {MAX_BODY_BYTES} are accepted: "
                            "start a new chat or send a shorter message")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError('the request body must be JSON: {"messages": [{"role": "user", "content": "..."}]}')
        turns = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(turns, list) or not turns:
            raise UserError('the request needs "messages": a non-empty list of {"role", "content"} objects')
        for i, turn in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if not (isinstance(turn, dict) and turn.get("role") == expected and isinstance(turn.get("content"), str)):
                raise UserError(f"messages[{i}] must be {{\"role\": \"{expected}\", \"content\": <text>}} "
                                "(user and assistant turns alternate, starting with the user)")
        last = turns[-1]["content"]
        if len(last) > MAX_MESSAGE_CHARS:
            raise UserError(f"the message is {len(last)} characters; at most {MAX_MESSAGE_CHARS} are accepted")
        return [{"role": t["role"], "content": t["content"]} for t in turns]

    def _stream_reply(self, prompt: list[int]) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        queue = self.server.queue
        ticket = queue.join()
        try:
            told = -1
            while (ahead := queue.ahead(ticket, QUEUE_POLL_SECONDS)) > 0:
                if ahead != told:
                    self._event("queued", {"ahead": ahead})
                    told = ahead
                self._check_client()
            self._event("start", {})
            reply = self.server.engine.reply(prompt)
            started = time.perf_counter()
            pieces = iter(reply)
            delivered = False
            try:
                for piece in pieces:
                    self._check_client()
                    self._event("text", {"text": piece})
                self._event("done", {"tokens": len(reply.token_ids), "finished": reply.finished,
                                     "seconds": round(time.perf_counter() - started, 3)})
                delivered = True
            finally:
                pieces.close()  # also on ClientGone: the sampler stops before the next request starts
                self.server.served.record(len(reply.token_ids), delivered)  # still holding the model: serialised
        finally:
            queue.leave(ticket)

    def _check_client(self) -> None:
        """Raise ClientGone if the browser hung up (writes alone notice that only a write or two later) or the
        server is stopping."""
        if self.server.stopping.is_set():
            raise ClientGone()
        readable, _, _ = select.select([self.connection], [], [], 0)
        if readable:
            try:
                data = self.connection.recv(1, socket.MSG_PEEK)
            except (ConnectionError, OSError):
                raise ClientGone() from None
            if not data:
                raise ClientGone()

    def _event(self, kind: str, data: dict) -> None:
        self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, "application/json", json.dumps(payload).encode())


def open_server(host: str, port: int) -> ChatServer:
    """Take the port first, so a port in use fails in a second rather than after the model has loaded."""
    try:
        return ChatServer((host, port))
    except OSError as error:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); "
                        "pick another --port (0 = any free one)") from None


def serve(server: ChatServer, engine: ChatEngine) -> None:
    server.engine = engine
    bound_host, bound_port = server.server_address[:2]
    if not ipaddress.ip_address(bound_host).is_loopback:
        print(f"warning: listening on {bound_host}; anyone who can reach it can use the model (no authentication)",
              file=sys.stderr)
    print(f"serving http://{bound_host}:{bound_port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how the server is meant to stop
        server.stopping.set()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while len(server.queue) and time.monotonic() < deadline:
            time.sleep(0.05)  # open streams notice `stopping` within one piece or one queue poll
        print("stopped", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m integration_training.chat",
        description="Chat with a model: HF id, local dir, run checkpoint (results/X/checkpoints/rl/step_N), or "
                    "offline:SmolLM2-135M-Instruct. The settings in force are printed at start.",
    )
    parser.add_argument("model")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    parser.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter (default 50)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="per reply (default 512)")
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's own, if any)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto: cuda if visible)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--prompt", default=None, help="answer this one message on stdout and exit")
    parser.add_argument("--web", action="store_true", help="serve a chat page instead of the terminal session")
    parser.add_argument("--host", default=None, help=f"--web address (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=None, help=f"--web port (default {DEFAULT_PORT}; 0 = any free)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    server = None
    # Ctrl-C must stop a reply, and the web server, even when the launching process left SIGINT ignored (a child
    # inherits an ignored signal across exec: seen when a test runner's earlier in-process run left it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_flags(args)
        if args.web:
            server = open_server(args.host or DEFAULT_HOST, DEFAULT_PORT if args.port is None else args.port)
        engine = load_engine(args)
        print(_settings_line(engine), file=sys.stderr, flush=True)
        if server is not None:
            serve(server, engine)
        elif args.prompt is not None:
            answer_once(engine, args.prompt)
        else:
            terminal_loop(engine)
    except UserError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, however the cause was worded
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or during --prompt: quit quietly, exit 3 as deploy.py does
        print("interrupted", file=sys.stderr)
        return 3
    finally:
        if server is not None:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
