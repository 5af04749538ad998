"""A small text-to-image search application on an exported tfemde model, without TensorFlow.

It imports only `tfemde.serving` (numpy, onnxruntime, sentencepiece) and the standard library, loads an export
(`tfemde export`) and an index (`tfemde index`), and answers text queries:

    python export/serve_app.py EXPORT_DIR INDEX --stdin          # one query per line in, one JSON line out
    python export/serve_app.py EXPORT_DIR INDEX --port 8080      # HTTP on 127.0.0.1 only

HTTP endpoints (JSON responses):
    GET  /search?q=a+red+car&k=5              -> {"query": ..., "results": [{"id": ..., "score": ...}, ...]}
    POST /search  {"queries": ["...", ...], "k": 5}  -> {"results": [[...], ...]}
    GET  /health                              -> {"status": "ok", "items": N, "model": ...}
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tfemde.serving import Encoder, SetIndex  # noqa: E402

HOST = "127.0.0.1"
MAX_K = 1000
MAX_BODY = 1 << 20


class SearchApp:
    """An encoder and an index answering text queries with the k best items."""

    def __init__(self, export_dir, index_path, default_k=5):
        self.encoder = Encoder.load(export_dir)
        self.index = SetIndex.load(index_path)
        self.default_k = default_k
        if (self.index.alpha, self.index.sketch_weight) != (self.encoder.alpha, self.encoder.sketch_weight):
            print(f"warning: the index scores with alpha={self.index.alpha}, sketch_weight="
                  f"{self.index.sketch_weight}; the model uses {self.encoder.similarity_kwargs}", file=sys.stderr)

    def search(self, queries, k=None):
        """`[[{"id", "score"}, ...k], ...]` for every query string."""
        k = self.default_k if k is None else int(k)
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}; got {k}")
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
        def _send(self, status, payload):
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            if url.path == "/health":
                return self._send(200, app.health())
            if url.path != "/search":
                return self._send(404, {"error": f"unknown path {url.path}; use /search or /health"})
            params = parse_qs(url.query)
            query = params.get("q", [""])[0]
            if not query:
                return self._send(400, {"error": "missing query: /search?q=...&k=5"})
            try:
                results = app.search([query], params.get("k", [None])[0])[0]
            except ValueError as error:
                return self._send(400, {"error": str(error)})
            return self._send(200, {"query": query, "results": results})

        def do_POST(self):  # noqa: N802
            if urlparse(self.path).path != "/search":
                return self._send(404, {"error": "POST to /search"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                return self._send(400, {"error": f"the body must be JSON of at most {MAX_BODY} bytes"})
            try:
                request = json.loads(self.rfile.read(length))
                queries = request["queries"] if "queries" in request else [request["query"]]
                if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
                    raise ValueError("queries must be a list of strings")
                results = app.search(queries, request.get("k"))
            except (ValueError, KeyError, TypeError) as error:
                return self._send(400, {"error": f"expected {{\"queries\": [...], \"k\": 5}}: {error}"})
            return self._send(200, {"results": results})

        def log_message(self, format, *args):  # noqa: A002 - quiet access log
            pass

    return Handler


def serve_stdin(app, k, stdin=sys.stdin, stdout=sys.stdout):
    """Answer one query per input line with one JSON line; blank lines are skipped."""
    for line in stdin:
        query = line.rstrip("\n")
        if not query.strip():
            continue
        started = time.perf_counter()
        results = app.search([query], k)[0]
        stdout.write(json.dumps({"query": query, "results": results,
                                 "ms": round(1000 * (time.perf_counter() - started), 2)}, ensure_ascii=False) + "\n")
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
    except ValueError as error:  # a missing or damaged export or index: one line
        print(f"serve_app: error: {error}", file=sys.stderr)
        return 2
    if args.stdin:
        serve_stdin(app, args.k)
        return 0
    server = HTTPServer((HOST, args.port), make_handler(app))
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
