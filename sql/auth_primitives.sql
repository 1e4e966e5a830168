-- Sign-in primitives: HS256 JWTs and argon2id passwords.
SET TimeZone = 'UTC';
\set VERBOSITY sqlstate
SET fluxrate.pinned_now = '2026-06-01 12:00:00+00';
SELECT convert_to(repeat('s', 40), 'UTF8') AS secret, convert_to(repeat('t', 40), 'UTF8') AS other \gset
-- exp = 2026-06-01 12:15:00 UTC = 1780316100 (15 minutes ahead)
SELECT fluxrate_internal.jwt_sign('{"role": "fluxrate_web", "org_id": "o-1", "exp": 1780316100}', :'secret') AS tok \gset
SELECT split_part(:'tok', '.', 1) AS header_b64, length(split_part(:'tok', '.', 3)) AS sig_chars;
SELECT fluxrate_internal.jwt_verify(:'tok', :'secret') AS claims;
-- refusals, all PT401, each with its reason: wrong secret, tampered payload, alg none,
-- expired, not yet valid, malformed
\set VERBOSITY default
SELECT fluxrate_internal.jwt_verify(:'tok', :'other');
SELECT fluxrate_internal.jwt_verify(split_part(:'tok', '.', 1) || '.' ||
       rtrim(translate(encode(convert_to('{"role":"fluxrate_web","org_id":"o-2","exp":1780316100}', 'UTF8'), 'base64'), '+/', '-_'), '=') ||
       '.' || split_part(:'tok', '.', 3), :'secret');
SELECT fluxrate_internal.jwt_verify(rtrim(translate(encode(convert_to('{"alg":"none","typ":"JWT"}', 'UTF8'), 'base64'), '+/', '-_'), '=') ||
       '.' || split_part(:'tok', '.', 2) || '.', :'secret');
SET fluxrate.pinned_now = '2026-06-01 12:15:31+00';     -- 31 s past exp: beyond the 30 s skew
SELECT fluxrate_internal.jwt_verify(:'tok', :'secret');
SET fluxrate.pinned_now = '2026-06-01 12:15:29+00';     -- within the skew: accepted
SELECT (fluxrate_internal.jwt_verify(:'tok', :'secret'))->>'org_id' AS within_skew;
SELECT fluxrate_internal.jwt_verify(fluxrate_internal.jwt_sign('{"nbf": 1780400000}', :'secret'), :'secret');
SELECT fluxrate_internal.jwt_verify('not.a-token', :'secret');
SELECT fluxrate_internal.jwt_verify('a.b.c.d', :'secret');
\set VERBOSITY sqlstate
SELECT fluxrate_internal.jwt_sign('{}', '\x00');           -- 22023 short secret
SELECT fluxrate_internal.jwt_sign('[1]', :'secret');        -- 22023 not an object

-- passwords: argon2id, verified, never stored in the clear
SELECT fluxrate_internal.password_hash('correct horse battery') AS h \gset
SELECT left(:'h', 10) AS algorithm, position('correct' IN :'h') AS plaintext_inside;
SELECT fluxrate_internal.password_verify(:'h', 'correct horse battery') AS right_password,
       fluxrate_internal.password_verify(:'h', 'correct horse batterz') AS wrong_password;
SELECT fluxrate_internal.password_hash('correct horse battery') <> :'h' AS salted;
SELECT fluxrate_internal.password_hash('short');            -- PT422
