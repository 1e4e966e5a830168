-- 87_public_documents.sql: the invoice a customer opens from the link in its
-- e-mail, as HTML or PDF, with no credentials (the public token is the
-- credential, as for public_invoice's JSON in 71_delivery_api.sql).
--
-- A browser following the link sends "Accept: text/html,...", which PostgREST
-- answers with the "text/html" handler, public_invoice_html; an organization
-- that wants its links to open the HTML invoice sets
--   update_organization(invoice_link_base => 'https://api.example.com/rpc/public_invoice_html?token=')
-- After the roles of 80_http.sql, so the grants below can name them.

-- The invoice a public token opens, across organizations (hence sys_): never
-- a DRAFT, NULL for an unknown, replaced or malformed token.
CREATE OR REPLACE FUNCTION fluxrate_internal.sys_public_invoice_key(token text, OUT org_id uuid, OUT invoice_id uuid)
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
BEGIN
  IF token ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    SELECT i.org_id, i.id INTO org_id, invoice_id
      FROM fluxrate_internal.invoices i WHERE i.public_token = sys_public_invoice_key.token::uuid AND i.status <> 'DRAFT';
  END IF;
END
$$;

-- The organization of the invoice, for the renderers (which run as the tenant
-- owner, under row-level security): the one the token opened, for this
-- transaction only.  An unknown token is the same 404 as public_invoice's.
CREATE OR REPLACE FUNCTION fluxrate_internal.open_public_invoice(token text, OUT org_id uuid, OUT invoice_id uuid)
  LANGUAGE plpgsql STABLE
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  k record := fluxrate_internal.sys_public_invoice_key(token);
BEGIN
  IF k.invoice_id IS NULL THEN
    PERFORM fluxrate_internal.fail('PT404', 'invoice not found', 'The link is unknown or was replaced by a newer one.');
  END IF;
  PERFORM set_config('fluxrate.current_org', k.org_id::text, true);
  org_id := k.org_id;
  invoice_id := k.invoice_id;
END
$$;

-- GET /rpc/public_invoice_html?token=... (Accept: text/html)
CREATE OR REPLACE FUNCTION fluxrate.public_invoice_html(token text) RETURNS fluxrate."text/html"
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  k record := fluxrate_internal.open_public_invoice(token);
BEGIN
  RETURN fluxrate_internal.render_invoice_html(k.org_id, k.invoice_id);
END
$$;

-- GET /rpc/public_invoice_pdf?token=... (Accept: application/pdf)
CREATE OR REPLACE FUNCTION fluxrate.public_invoice_pdf(token text) RETURNS fluxrate."application/pdf"
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $$
DECLARE
  k record := fluxrate_internal.open_public_invoice(token);
BEGIN
  RETURN fluxrate_internal.render_invoice_pdf(k.org_id, k.invoice_id);
END
$$;

-- no credentials, like public_invoice (99_security.sql revokes PUBLIC's, not these)
GRANT EXECUTE ON FUNCTION fluxrate.public_invoice_html(text), fluxrate.public_invoice_pdf(text)
  TO fluxrate_anon, fluxrate_web, fluxrate_apikey;
