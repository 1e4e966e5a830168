#!/usr/bin/python3
"""A real HTTP receiver for the webhook tests (Python's standard library).

usage: http_sink.py DIR [ADDRESS]
Listens on ADDRESS (default 127.0.0.1; any loopback address), on a free port it writes to DIR/port once ready.  Each
POST is written to DIR/NNN.json as {headers, body}; the answer's status is the
number in DIR/status (default 200), so a test can make the receiver fail and
recover.
"""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
count = 0

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        count += 1
        path = os.path.join(out, "%03d.json" % count)
        with open(path + ".tmp", "w") as f:
            json.dump({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                       "body": body.decode("utf-8")}, f)
        os.rename(path + ".tmp", path)
        try:
            status = int(open(os.path.join(out, "status")).read().strip())
        except (OSError, ValueError):
            status = 200
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"received\n" if status < 300 else b"receiver is failing on purpose\n")

    def log_message(self, *args):
        pass

srv = ThreadingHTTPServer((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", 0), Handler)
with open(os.path.join(out, "port"), "w") as f:
    f.write(str(srv.server_address[1]))
srv.serve_forever()
