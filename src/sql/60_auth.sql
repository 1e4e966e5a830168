-- 60_auth.sql: sign-in primitives (src/jwt.c).  The HTTP layer (sign-up, login,
-- refresh, logout, the PostgREST pre-request, roles) builds on these.

CREATE FUNCTION fluxrate_internal.jwt_sign(claims jsonb, secret bytea) RETURNS text
  LANGUAGE C IMMUTABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_jwt_sign';
COMMENT ON FUNCTION fluxrate_internal.jwt_sign(jsonb, bytea) IS 'HS256 JWT of the claims (OpenSSL HMAC-SHA256)';

CREATE FUNCTION fluxrate_internal.jwt_verify(token text, secret bytea) RETURNS jsonb
  LANGUAGE C STABLE STRICT
  AS 'MODULE_PATHNAME', 'fr_jwt_verify';
COMMENT ON FUNCTION fluxrate_internal.jwt_verify(text, bytea) IS
  'the claims of a valid HS256 token (signature in constant time, exp/nbf against fluxrate.now(), 30 s skew), else PT401';

CREATE FUNCTION fluxrate_internal.password_hash(password text) RETURNS text
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_password_hash';
COMMENT ON FUNCTION fluxrate_internal.password_hash(text) IS 'argon2id (libsodium crypto_pwhash_str, interactive limits)';

CREATE FUNCTION fluxrate_internal.password_verify(hash text, password text) RETURNS boolean
  LANGUAGE C VOLATILE STRICT
  AS 'MODULE_PATHNAME', 'fr_password_verify';
