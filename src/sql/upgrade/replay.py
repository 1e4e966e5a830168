#!/usr/bin/env python3
"""Print the replayable statements of the install-script parts (make calls this).

The upgrade script to the version under development is

    src/sql/upgrade/A--B.sql          hand-written steps for what holds state or cannot
                                      be replayed (tables, columns, indexes, triggers,
                                      types, aggregates, roles, dropped or re-signed
                                      functions), then
    replay.py src/sql/NN_*.sql        every definition that can be run again over an
                                      installed extension: CREATE [OR REPLACE] FUNCTION |
                                      PROCEDURE (written out as CREATE OR REPLACE), any
                                      CREATE OR REPLACE ..., COMMENT ON, GRANT, REVOKE and
                                      the idempotent role blocks (DO $roles$ ... $roles$),
    src/sql/99_security.sql           owners, row-level security and privileges, again.

so a function changed in its part needs no second copy in the upgrade script, and
test/scripts/upgrade.sh fails on anything the hand-written steps forgot (it compares an
updated 0.1.0 with a fresh install, catalog object by catalog object).

The statement splitter knows what PostgreSQL's lexer needs for this: -- and /* */
comments (nested), '...' strings (with '' inside), "..." identifiers and $tag$ ... $tag$
bodies.  Everything else is passed through untouched.
"""
import re
import sys

DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def statements(text):
    """Yield (statement text, leading comment-free text) for each top-level statement."""
    i, n, start = 0, len(text), 0
    while i < n:
        c = text[i]
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "'" or c == '"':
            i += 1
            while i < n:
                if text[i] == c:
                    if i + 1 < n and text[i + 1] == c:
                        i += 2
                        continue
                    i += 1
                    break
                i += 1
        elif c == "$":
            m = DOLLAR.match(text, i)
            # a dollar quote cannot follow an identifier character ($1, a$b)
            if m and not (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")):
                end = text.find(m.group(0), m.end())
                if end < 0:
                    sys.exit("replay.py: unterminated %s" % m.group(0))
                i = end + len(m.group(0))
            else:
                i += 1
        elif c == ";":
            yield text[start:i + 1]
            i += 1
            start = i
        else:
            i += 1
    if text[start:].strip() and strip_comments(text[start:]).strip():
        sys.exit("replay.py: text after the last statement: %r" % text[start:][:80])


def strip_comments(stmt):
    """The statement without its leading comments and blank lines."""
    s = stmt
    while True:
        s = s.lstrip()
        if s.startswith("--"):
            j = s.find("\n")
            s = "" if j < 0 else s[j + 1:]
        elif s.startswith("/*"):
            j = s.find("*/")
            s = "" if j < 0 else s[j + 2:]
        else:
            return s


REPLAY = re.compile(
    r"^(CREATE\s+OR\s+REPLACE\s|COMMENT\s+ON\s|GRANT\s|REVOKE\s|DO\s+\$roles\$)", re.I)
PLAIN_ROUTINE = re.compile(r"^CREATE\s+(FUNCTION|PROCEDURE)\s", re.I)


def main(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        out = []
        for stmt in statements(text):
            body = strip_comments(stmt)
            if PLAIN_ROUTINE.match(body):
                out.append(PLAIN_ROUTINE.sub(lambda m: "CREATE OR REPLACE %s " % m.group(1).upper(),
                                             body, count=1))
            elif REPLAY.match(body):
                out.append(body)
        if out:
            print("\n-- ==== replayed from %s ====" % path)
            for s in out:
                print(s)


if __name__ == "__main__":
    main(sys.argv[1:])
