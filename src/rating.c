/*-------------------------------------------------------------------------
 * rating.c
 *	  From a billable quantity to an (unrounded) amount, for every charge model.
 *
 * All arithmetic is numeric and exact; rounding happens once, later, per
 * invoice line (currency.c).  Models:
 *	  flat       FIXED charge: the amount itself (unit_price)
 *	  per_unit   billable x unit_price
 *	  graduated  each tier prices the units that fall in it, plus the flat_fee of
 *	             every tier reached
 *	  volume     every unit at the price of the tier the total falls in, plus
 *	             that tier's flat_fee
 *	  package    ceil(billable / package_size) x package_price (a partial
 *	             package counts as a whole one)
 * billable = max(usage - free_units, 0) for the usage models.  Tiers are
 * [{up_to, unit_price, flat_fee}], up_to inclusive, the last one null.  Zero
 * billable usage costs nothing, flat fees included.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "fluxrate.h"

#define N(d)		DatumGetNumeric(d)
#define ADD(a,b)	N(DirectFunctionCall2(numeric_add, NumericGetDatum(a), NumericGetDatum(b)))
#define SUB(a,b)	N(DirectFunctionCall2(numeric_sub, NumericGetDatum(a), NumericGetDatum(b)))
#define MUL(a,b)	N(DirectFunctionCall2(numeric_mul, NumericGetDatum(a), NumericGetDatum(b)))
#define CMP(a,b)	DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a), NumericGetDatum(b)))

static Numeric
Zero(void)
{
	return int64_to_numeric(0);
}

static Numeric
MemberNumeric(JsonbContainer *obj, const char *key, bool *present)
{
	JsonbValue	k;
	JsonbValue *v;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(obj, JB_FOBJECT, &k);
	*present = (v != NULL && v->type == jbvNumeric);
	if (v != NULL && v->type != jbvNumeric && v->type != jbvNull)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tier %s must be a number", key)));
	return *present ? v->val.numeric : NULL;
}

typedef struct Tier
{
	Numeric		up_to;			/* NULL = unbounded */
	Numeric		unit_price;
	Numeric		flat_fee;
} Tier;

static Tier *
ParseTiers(Jsonb *tiers, int *ntiers)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	Tier	   *out;
	int			n = 0;

	if (tiers == NULL || !JB_ROOT_IS_ARRAY(tiers) || JB_ROOT_COUNT(tiers) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tiers must be a non-empty array")));
	out = palloc0(sizeof(Tier) * JB_ROOT_COUNT(tiers));
	it = JsonbIteratorInit(&tiers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		bool		p;

		if (tok != WJB_ELEM)
			continue;
		if (v.type != jbvBinary)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("tier %d is not an object", n + 1)));
		out[n].up_to = MemberNumeric(v.val.binary.data, "up_to", &p);
		out[n].unit_price = MemberNumeric(v.val.binary.data, "unit_price", &p);
		if (!p)
			out[n].unit_price = Zero();
		out[n].flat_fee = MemberNumeric(v.val.binary.data, "flat_fee", &p);
		if (!p)
			out[n].flat_fee = Zero();
		n++;
	}
	*ntiers = n;
	return out;
}

static Numeric
Graduated(Numeric billable, Tier *t, int n)
{
	Numeric		amount = Zero();
	Numeric		prev = Zero();

	for (int i = 0; i < n; i++)
	{
		bool		last = (t[i].up_to == NULL || i == n - 1);
		Numeric		top = (last || CMP(billable, t[i].up_to) < 0) ? billable : t[i].up_to;
		Numeric		units = SUB(top, prev);

		if (CMP(units, Zero()) <= 0)
			break;
		amount = ADD(amount, ADD(MUL(units, t[i].unit_price), t[i].flat_fee));
		if (last || CMP(billable, t[i].up_to) <= 0)
			break;
		prev = t[i].up_to;
	}
	return amount;
}

static Numeric
Volume(Numeric billable, Tier *t, int n)
{
	for (int i = 0; i < n; i++)
	{
		if (t[i].up_to == NULL || i == n - 1 || CMP(billable, t[i].up_to) <= 0)
			return ADD(MUL(billable, t[i].unit_price), t[i].flat_fee);
	}
	return Zero();				/* not reached: n > 0 */
}

static Numeric
Package(Numeric billable, Numeric size, Numeric price)
{
	Numeric		packages;

	if (size == NULL || CMP(size, Zero()) <= 0)
		ereport(ERROR,
				(errcode(FR_ERRCODE_UNPROCESSABLE),
				 errmsg("package_size must be greater than zero")));
	/* exact ceiling: truncated quotient, plus one if a remainder is left */
	packages = N(DirectFunctionCall2(numeric_div_trunc, NumericGetDatum(billable), NumericGetDatum(size)));
	if (CMP(MUL(packages, size), billable) < 0)
		packages = ADD(packages, int64_to_numeric(1));
	return MUL(packages, price ? price : Zero());
}

/*
 * fluxrate_internal.rate_usage(pricing_model, unit_price, tiers, package_size,
 *                              package_price, free_units, usage) -> numeric
 */
PG_FUNCTION_INFO_V1(fr_rate_usage);
Datum
fr_rate_usage(PG_FUNCTION_ARGS)
{
	char	   *model;
	Numeric		unit_price = PG_ARGISNULL(1) ? NULL : PG_GETARG_NUMERIC(1);
	Numeric		free_units = PG_ARGISNULL(5) ? Zero() : PG_GETARG_NUMERIC(5);
	Numeric		usage = PG_ARGISNULL(6) ? Zero() : PG_GETARG_NUMERIC(6);
	Numeric		billable;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("pricing_model is required")));
	model = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (strcmp(model, "flat") == 0)
		PG_RETURN_NUMERIC(unit_price ? unit_price : Zero());

	billable = SUB(usage, free_units);
	if (CMP(billable, Zero()) <= 0)
		PG_RETURN_NUMERIC(Zero());

	if (strcmp(model, "per_unit") == 0)
		PG_RETURN_NUMERIC(MUL(billable, unit_price ? unit_price : Zero()));
	if (strcmp(model, "graduated") == 0 || strcmp(model, "volume") == 0)
	{
		int			n;
		Tier	   *t;

		if (PG_ARGISNULL(2))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("tiers are required for %s pricing", model)));
		t = ParseTiers(PG_GETARG_JSONB_P(2), &n);
		PG_RETURN_NUMERIC(model[0] == 'g' ? Graduated(billable, t, n) : Volume(billable, t, n));
	}
	if (strcmp(model, "package") == 0)
		PG_RETURN_NUMERIC(Package(billable, PG_ARGISNULL(3) ? NULL : PG_GETARG_NUMERIC(3),
								  PG_ARGISNULL(4) ? NULL : PG_GETARG_NUMERIC(4)));
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown pricing_model: %s", model)));
	PG_RETURN_NULL();
}
