#!/usr/bin/env python3
"""A live OTLP/HTTP trace receiver for the benchmark: accepts POST /v1/traces, reads the
protobuf body, counts bytes and batches, answers 200 with an empty
ExportTraceServiceResponse. Loopback only. Usage: otlp-sink.py [PORT]"""
import http.server
import signal
import sys
import threading

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 14318
stats = {"batches": 0, "bytes": 0}
lock = threading.Lock()


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        with lock:
            stats["batches"] += 1
            stats["bytes"] += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


# Background jobs ignore SIGINT: stop on SIGTERM too, printing the counts.
signal.signal(signal.SIGTERM, signal.default_int_handler)
server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Sink)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
finally:
    print(f"otlp-sink: {stats['batches']} batches, {stats['bytes']} bytes", file=sys.stderr)
