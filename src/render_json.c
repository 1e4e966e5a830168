/*-------------------------------------------------------------------------
 * render_json.c
 *	  A jsonb document as json text with its keys in a given order.
 *
 * jsonb stores an object's keys sorted by length, then bytes, so every
 * document fluxrate builds with jsonb_build_object prints "id", "tax",
 * "kind", "total", ... : amounts between dates, the name after the
 * timestamps.  The reads a person looks at (get_invoice, get_meter_usage)
 * return json instead, whose text keeps the order it was written in.  The
 * documents are still built as jsonb (they compose with || and the jsonb
 * operators); this file writes one out with each object's keys in the order
 * of key_order (75_render.sql holds the list), the keys it does not name
 * where "*" stands in it (else last), in byte order, formatted as jsonb
 * prints (", " and ": ").
 *
 * In C because a recursive SQL function over jsonb_each() costs a plan per
 * nested value (a 720-bucket usage document took 180 ms that way).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "fluxrate.h"

typedef struct
{
	char	  **keys;
	int			n;
	int			unknown;		/* the rank of a key the list does not name: where "*" is */
} KeyOrder;

typedef struct
{
	char	   *key;
	int			rank;
	StringInfoData value;
} Member;

static void EmitContainer(JsonbContainer *jc, StringInfo out, KeyOrder *ko);

static int
Rank(KeyOrder *ko, const char *key)
{
	for (int i = 0; i < ko->n; i++)
		if (strcmp(ko->keys[i], key) == 0)
			return i;
	return ko->unknown;
}

static int
CompareMembers(const void *a, const void *b)
{
	const Member *x = (const Member *) a;
	const Member *y = (const Member *) b;

	if (x->rank != y->rank)
		return x->rank < y->rank ? -1 : 1;
	return strcmp(x->key, y->key);
}

static void
EmitValue(JsonbValue *v, StringInfo out, KeyOrder *ko)
{
	switch (v->type)
	{
		case jbvNull:
			appendStringInfoString(out, "null");
			break;
		case jbvBool:
			appendStringInfoString(out, v->val.boolean ? "true" : "false");
			break;
		case jbvNumeric:
			appendStringInfoString(out, DatumGetCString(DirectFunctionCall1(numeric_out,
																			NumericGetDatum(v->val.numeric))));
			break;
		case jbvString:
			escape_json(out, pnstrdup(v->val.string.val, v->val.string.len));
			break;
		case jbvBinary:
			EmitContainer(v->val.binary.data, out, ko);
			break;
		default:
			elog(ERROR, "unexpected jsonb value type %d", (int) v->type);
	}
}

static void
EmitContainer(JsonbContainer *jc, StringInfo out, KeyOrder *ko)
{
	JsonbIterator *it = JsonbIteratorInit(jc);
	JsonbValue	v;
	JsonbIteratorToken tok;

	check_stack_depth();
	tok = JsonbIteratorNext(&it, &v, true);
	if (tok == WJB_BEGIN_ARRAY)
	{
		bool		raw = v.val.array.rawScalar;
		bool		first = true;

		if (!raw)
			appendStringInfoChar(out, '[');
		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM)
				continue;
			if (!first)
				appendStringInfoString(out, ", ");
			first = false;
			EmitValue(&v, out, ko);
		}
		if (!raw)
			appendStringInfoChar(out, ']');
	}
	else if (tok == WJB_BEGIN_OBJECT)
	{
		int			cap = v.val.object.nPairs > 0 ? v.val.object.nPairs : 1;
		Member	   *m = palloc(sizeof(Member) * cap);
		int			n = 0;

		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (tok == WJB_KEY)
			{
				if (n == cap)
				{
					cap *= 2;
					m = repalloc(m, sizeof(Member) * cap);
				}
				m[n].key = pnstrdup(v.val.string.val, v.val.string.len);
				m[n].rank = Rank(ko, m[n].key);
				initStringInfo(&m[n].value);
			}
			else if (tok == WJB_VALUE)
				EmitValue(&v, &m[n++].value, ko);
		}
		qsort(m, n, sizeof(Member), CompareMembers);
		appendStringInfoChar(out, '{');
		for (int i = 0; i < n; i++)
		{
			if (i > 0)
				appendStringInfoString(out, ", ");
			escape_json(out, m[i].key);
			appendStringInfoString(out, ": ");
			appendBinaryStringInfo(out, m[i].value.data, m[i].value.len);
		}
		appendStringInfoChar(out, '}');
	}
	else
		elog(ERROR, "unexpected jsonb token %d", (int) tok);
}

/*
 * fluxrate_internal.json_in_order(doc jsonb, key_order text[]) RETURNS json
 */
PG_FUNCTION_INFO_V1(fr_json_in_order);
Datum
fr_json_in_order(PG_FUNCTION_ARGS)
{
	Jsonb	   *doc = PG_GETARG_JSONB_P(0);
	ArrayType  *order = PG_GETARG_ARRAYTYPE_P(1);
	Datum	   *elems;
	bool	   *nulls;
	KeyOrder	ko;
	StringInfoData out;

	deconstruct_array(order, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &ko.n);
	ko.keys = palloc(sizeof(char *) * (ko.n > 0 ? ko.n : 1));
	ko.unknown = ko.n;
	for (int i = 0; i < ko.n; i++)
	{
		ko.keys[i] = nulls[i] ? pstrdup("") : TextDatumGetCString(elems[i]);
		if (strcmp(ko.keys[i], "*") == 0)
			ko.unknown = i;
	}
	initStringInfo(&out);
	EmitContainer(&doc->root, &out, &ko);
	PG_RETURN_TEXT_P(cstring_to_text_with_len(out.data, out.len));
}
