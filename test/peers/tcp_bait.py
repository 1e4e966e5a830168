#!/usr/bin/python3
"""Loopback TCP listeners for the outbound-policy tests (standard library only).

usage: tcp_bait.py DIR MODE ADDRESS...
Listens on each ADDRESS (loopback only) on free ports, written one per line to
DIR/ports once ready.  MODE:
  record   accept, append one line per connection to DIR/hits, close: a target
           the policy must never let the database reach (DIR/hits stays absent)
  silent   accept and never answer: an endpoint that hangs; DIR/max holds the
           most connections that were open at once, DIR/total all accepted
"""
import os, selectors, socket, sys

out, mode, addrs = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(out, exist_ok=True)
sel = selectors.DefaultSelector()
ports = []
for a in addrs:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a, 0))
    s.listen(64)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, "listen")
    ports.append(str(s.getsockname()[1]))
with open(os.path.join(out, "ports.tmp"), "w") as f:
    f.write("\n".join(ports) + "\n")
os.rename(os.path.join(out, "ports.tmp"), os.path.join(out, "ports"))

def write(name, value):
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        f.write(str(value))
    os.rename(os.path.join(out, name + ".tmp"), os.path.join(out, name))

open_now = most = total = 0
while True:
    # closes before accepts: a client that gives up and dials again at once must
    # not be counted twice
    for key, _ in sorted(sel.select(), key=lambda e: e[0].data == "listen"):
        if key.data == "listen":
            c, peer = key.fileobj.accept()
            if mode == "record":
                with open(os.path.join(out, "hits"), "a") as f:
                    f.write("%s %s\n" % (key.fileobj.getsockname()[:2], peer[:2]))
                c.close()
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, "conn")
            open_now += 1; total += 1; most = max(most, open_now)
            write("max", most); write("total", total)
        else:
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if not data:                 # the client gave up (its timeout)
                sel.unregister(key.fileobj); key.fileobj.close()
                open_now -= 1
