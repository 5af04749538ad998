"""A small text-to-image search application on an exported tfemde model, without TensorFlow.

It imports only `tfemde.serving` (numpy, onnxruntime, sentencepiece) and the standard library, loads an export
(`tfemde export`) and an index (`tfemde index`), and answers text queries:

    python export/serve_app.py EXPORT_DIR INDEX --stdin          # one query per line in, one JSON line out
    python export/serve_app.py EXPORT_DIR INDEX --port 8080      # HTTP on 127.0.0.1 only

HTTP endpoints (JSON responses):
    GET  /search?q=a+red+car&k=5              -> {"query": ..., "results": [{"id": ..., "score": ...}, ...]}
    POST /search  {"queries": ["...", ...], "k": 5}  -> {"results": [[...], ...]}
    GET  /health                              -> {"status": "ok", "items": N, "model": ...}

Every request is answered with JSON, errors too (4xx with {"error": ...}; 500 if the server itself fails). Each
connection has its own thread and a socket timeout, so a slow or half-sent request holds only its own thread; a
request carries at most MAX_QUERIES queries of at most MAX_QUERY_CHARS characters each, and k is at most MAX_K.
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tfemde.serving import Encoder, load_index  # noqa: E402

HOST = "127.0.0.1"
MAX_K = 1000
MAX_BODY = 1 << 20
MAX_QUERIES = 256
MAX_QUERY_CHARS = 2000
TIMEOUT_S = 10.0  # per connection: a client that sends nothing for this long is dropped


def _check_k(k, default):
    """k as an int in [1, MAX_K]: a JSON integer or a decimal string (from a URL); anything else is a ValueError."""
    if k is None:
        return default
    if isinstance(k, str) and k.strip().isdigit():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer between 1 and {MAX_K}; got {k!r}"[:200])
    return k


def _check_queries(queries):
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("queries must be a list of strings")
    if len(queries) > MAX_QUERIES:
        raise ValueError(f"at most {MAX_QUERIES} queries per request; got {len(queries)}")
    for i, query in enumerate(queries):
        if len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"query {i} has {len(query)} characters; at most {MAX_QUERY_CHARS}")
    return queries


class SearchApp:
    """An encoder and an index answering text queries with the k best items."""

    def __init__(self, export_dir, index_path, default_k=5):
        self.encoder = Encoder.load(export_dir)
        self.index = load_index(index_path)  # a SetIndex file or an AnnSetIndex folder
        self.default_k = default_k
        if (self.index.alpha, self.index.sketch_weight) != (self.encoder.alpha, self.encoder.sketch_weight):
            print(f"warning: the index scores with alpha={self.index.alpha}, sketch_weight="
                  f"{self.index.sketch_weight}; the model uses {self.encoder.similarity_kwargs}", file=sys.stderr)

    def search(self, queries, k=None):
        """`[[{"id", "score"}, ...k], ...]` for every query string."""
        k = _check_k(k, self.default_k)
        queries = _check_queries(queries)
        if not queries:
            return []
        ids, scores = self.index.search(self.encoder.encode_texts(queries), k=k)
        return [[{"id": i, "score": round(float(s), 6)} for i, s in zip(row_ids.tolist(), row_scores)]
                for row_ids, row_scores in zip(ids, scores)]

    def health(self):
        return {"status": "ok", "items": len(self.index), "model": self.encoder.manifest.get("preset"),
                "providers": [p if isinstance(p, str) else p[0] for p in self.encoder.providers]}


def make_handler(app):
    class Handler(BaseHTTPRequestHandler):
        timeout = TIMEOUT_S

        def _send(self, status, payload):
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_error(self, code, message=None, explain=None):  # http.server's own errors (bad request line, ...)
            self.close_connection = True
            try:
                self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})
            except OSError:
                pass

        def _answer(self, respond):
            try:
                status, payload = respond()
            except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
                status, payload = 400, {"error": f"{type(error).__name__}: {error}"[:500]}
            except Exception as error:  # noqa: BLE001 - the client still gets JSON
                status, payload = 500, {"error": f"internal error: {type(error).__name__}"}
            self._send(status, payload)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._answer(self._get)

        def do_POST(self):  # noqa: N802
            self._answer(self._post)

        def _get(self):
            url = urlparse(self.path)
            if url.path == "/health":
                return 200, app.health()
            if url.path != "/search":
                return 404, {"error": f"unknown path {url.path[:100]}; use /search or /health"}
            params = parse_qs(url.query)
            query = params.get("q", [""])[0]
            if not query:
                return 400, {"error": "missing query: /search?q=...&k=5"}
            return 200, {"query": query, "results": app.search([query], params.get("k", [None])[0])[0]}

        def _post(self):
            if urlparse(self.path).path != "/search":
                return 404, {"error": "POST to /search"}
            raw_length = self.headers.get("Content-Length", "")
            length = int(raw_length) if raw_length.strip().isdigit() else -1
            if not 0 < length <= MAX_BODY:
                self.close_connection = True  # the body, if any, is not read
                return 400, {"error": f"the body must be JSON of 1 to {MAX_BODY} bytes with a Content-Length; got "
                                      f"Content-Length {raw_length[:40]!r}"}
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                return 400, {"error": 'expected {"queries": [...], "k": 5}'}
            queries = request["queries"] if "queries" in request else [request["query"]]
            return 200, {"results": app.search(queries, request.get("k"))}

        def log_message(self, format, *args):  # noqa: A002 - quiet access log
            pass

    return Handler


def serve_stdin(app, k, stdin=None, stdout=None):
    """Answer one query per input line with one JSON line; blank lines are skipped, bad lines get an error line."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout
    for number, line in enumerate(stdin, 1):
        started = time.perf_counter()
        try:
            query = line.decode("utf-8") if isinstance(line, bytes) else line
            query = query.rstrip("\r\n")
            if not query.strip():
                continue
            answer = {"query": query, "results": app.search([query], k)[0]}
        except (ValueError, UnicodeDecodeError) as error:
            answer = {"line": number, "error": f"{type(error).__name__}: {error}"[:500]}
        answer["ms"] = round(1000 * (time.perf_counter() - started), 2)
        stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
        stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("index")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdin", action="store_true", help="read queries from stdin, write JSON lines")
    mode.add_argument("--port", type=int, help=f"serve HTTP on {HOST}:PORT (0 picks a free port)")
    parser.add_argument("-k", type=int, default=5, help="results per query")
    args = parser.parse_args(argv)
    try:
        app = SearchApp(args.export_dir, args.index, default_k=args.k)
    except (ValueError, ImportError) as error:  # a missing or damaged export or index, no faiss: one line
        print(f"serve_app: error: {error}", file=sys.stderr)
        return 2
    if args.stdin:
        serve_stdin(app, args.k)
        return 0
    server = ThreadingHTTPServer((HOST, args.port), make_handler(app))
    server.daemon_threads = True
    print(f"listening on http://{HOST}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
