#!/usr/bin/python3
"""A real SMTP server for the delivery tests (python3-aiosmtpd from Debian).

usage: smtp_sink.py DIR USER PASSWORD [PORT]
Listens on 127.0.0.1, on PORT or a free port, which it writes to DIR/port once ready.  Accepts
AUTH PLAIN/LOGIN only with USER/PASSWORD (so a test proves the sealed password
really reached the server), over plain text because this is loopback.  Every
accepted message is written to DIR/NNN.eml with the envelope in DIR/NNN.json.
"""
import json, os, socket, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

out, user, password = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)

class Sink:
    n = 0
    async def handle_DATA(self, server, session, envelope):
        Sink.n += 1
        base = os.path.join(out, "%d-%03d" % (os.getpid(), Sink.n))
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        with open(base + ".json", "w") as f:
            json.dump({"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                       "auth": session.authenticated}, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        return "250 OK"

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = auth_data.login.decode() == user and auth_data.password.decode() == password
    return AuthResult(success=ok)

if len(sys.argv) > 4:
    port = int(sys.argv[4])
else:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
ctl = Controller(Sink(), hostname="127.0.0.1", port=port, authenticator=authenticator,
                 auth_required=True, auth_require_tls=False)
ctl.start()
with open(os.path.join(out, "port"), "w") as f:
    f.write(str(port))
try:
    while True:
        time.sleep(3600)
finally:
    ctl.stop()
