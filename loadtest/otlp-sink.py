#!/usr/bin/env python3
"""A minimal OTLP/HTTP sink for benchmarks: accepts POST /v1/traces and answers
200 without decoding, so the cost measured is Herald's, not a collector's.

Usage: loadtest/otlp-sink.py PORT
"""
import http.server
import sys


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
