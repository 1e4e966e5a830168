/*-------------------------------------------------------------------------
 * periods.c
 *	  A subscription's period boundaries: period_boundary() and
 *	  nominal_period() (src/sql/22_subscriptions.sql, 50_periods.sql).
 *
 * Boundary n of a subscription's periods (n = 0 is the anchor itself):
 *	  anniversary  anchor + n x interval, always from the anchor (never from the
 *	               previous boundary), in UTC, so Jan 31 -> Feb 28/29 -> Mar 31
 *	  calendar     the first boundary is the next calendar boundary after the
 *	               anchor (next month start, next Monday, ...), then whole
 *	               calendar intervals
 * The nominal period n is [boundary n, boundary n + 1), except a calendar
 * subscription's first, partial period, whose nominal start is one whole
 * interval before its end (it prorates against the calendar interval it ends).
 *
 * In C because the closer evaluates both for every claimed subscription: as
 * PL/pgSQL (the first version) they cost ~4 µs a subscription, a third of a
 * batch's period stage.  The arithmetic is PostgreSQL's own (interval_mul,
 * timestamp_pl_interval, timestamp_trunc), called directly, so the results,
 * the month-end clamping and the out-of-range errors are exactly those of the
 * SQL expressions the PL/pgSQL versions evaluated; sql/periods.sql checks the
 * two against each other.  In UTC a timestamptz and its timestamp AT TIME
 * ZONE 'UTC' are the same microsecond count, so no conversion is needed.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "common/int.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "fluxrate.h"

/* The interval of one period, and the date_trunc unit of its calendar
 * boundaries; false for an unknown billing_interval. */
static bool
interval_step(const char *name, Interval *step, const char **unit)
{
	memset(step, 0, sizeof(Interval));
	*unit = name;
	if (strcmp(name, "day") == 0)
		step->day = 1;
	else if (strcmp(name, "week") == 0)
		step->day = 7;
	else if (strcmp(name, "month") == 0)
		step->month = 1;
	else if (strcmp(name, "quarter") == 0)
		step->month = 3;
	else if (strcmp(name, "year") == 0)
		step->month = 12;
	else
		return false;
	return true;
}

/* ts + step x k (k >= 0), as timestamp + interval * integer in SQL */
static Timestamp
add_steps(Timestamp ts, Interval *step, int32 k)
{
	Datum		span = DirectFunctionCall2(interval_mul, IntervalPGetDatum(step), Float8GetDatum((float8) k));

	return DatumGetTimestamp(DirectFunctionCall2(timestamp_pl_interval, TimestampGetDatum(ts), span));
}

static Timestamp
boundary(Timestamp anchor, Interval *step, const char *unit, bool calendar, int32 n)
{
	Timestamp	first;

	if (n <= 0)
		return anchor;
	if (calendar)
	{
		first = DatumGetTimestamp(DirectFunctionCall2(timestamp_trunc, CStringGetTextDatum(unit),
													  TimestampGetDatum(anchor)));
		first = add_steps(first, step, 1);
		return add_steps(first, step, n - 1);
	}
	return add_steps(anchor, step, n);
}

static void
invalid_interval(const char *name)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid billing_interval: %s", name),
			 errhint("One of day, week, month, quarter, year.")));
}

/*
 * period_boundary(anchor timestamptz, billing_interval text, alignment text,
 *                 n integer) RETURNS timestamptz
 * Not strict, as the PL/pgSQL version was: a null billing_interval is an
 * error, a null anchor or n a null boundary, a null alignment anniversary.
 */
PG_FUNCTION_INFO_V1(fr_period_boundary);
Datum
fr_period_boundary(PG_FUNCTION_ARGS)
{
	Interval	step;
	const char *unit;
	char	   *name;
	bool		calendar;

	if (PG_ARGISNULL(1))
		invalid_interval("");
	name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (!interval_step(name, &step, &unit))
		invalid_interval(name);
	if (PG_ARGISNULL(0) || PG_ARGISNULL(3))
		PG_RETURN_NULL();
	calendar = !PG_ARGISNULL(2) && strcmp(text_to_cstring(PG_GETARG_TEXT_PP(2)), "calendar") == 0;
	PG_RETURN_TIMESTAMPTZ(boundary(PG_GETARG_TIMESTAMPTZ(0), &step, unit, calendar, PG_GETARG_INT32(3)));
}

static Datum
attribute(HeapTupleHeader row, const char *name, bool *isnull)
{
	return GetAttributeByName(row, name, isnull);
}

/*
 * nominal_period(s subscriptions, OUT nominal_start timestamptz,
 *                OUT nominal_end timestamptz)
 * The nominal bounds of the subscription's current period (its
 * current_period_index).  Strict: a null row has no period.
 */
PG_FUNCTION_INFO_V1(fr_nominal_period);
Datum
fr_nominal_period(PG_FUNCTION_ARGS)
{
	HeapTupleHeader row = PG_GETARG_HEAPTUPLEHEADER(0);
	TupleDesc	desc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	bool		isnull;
	Datum		d;
	Timestamp	anchor = 0;
	bool		anchor_null;
	char	   *name;
	bool		calendar = false;
	int32		idx = 0;
	bool		idx_null;
	int32		next;
	Interval	step;
	const char *unit;
	Timestamp	end;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "nominal_period must return a composite type");
	desc = BlessTupleDesc(desc);

	d = attribute(row, "billing_interval", &isnull);
	name = isnull ? "" : TextDatumGetCString(d);
	if (!interval_step(name, &step, &unit))
		invalid_interval(name);
	d = attribute(row, "alignment", &isnull);
	if (!isnull)
		calendar = strcmp(TextDatumGetCString(d), "calendar") == 0;
	d = attribute(row, "billing_anchor", &anchor_null);
	if (!anchor_null)
		anchor = DatumGetTimestampTz(d);
	d = attribute(row, "current_period_index", &idx_null);
	if (!idx_null)
		idx = DatumGetInt32(d);

	if (anchor_null || idx_null)
		nulls[0] = nulls[1] = true;
	else
	{
		if (pg_add_s32_overflow(idx, 1, &next))
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("integer out of range")));
		end = boundary(anchor, &step, unit, calendar, next);
		values[1] = TimestampTzGetDatum(end);
		if (idx == 0 && calendar)
			/* the partial first calendar period: the whole interval it ends */
			values[0] = DirectFunctionCall2(timestamp_mi_interval, TimestampGetDatum(end), IntervalPGetDatum(&step));
		else
			values[0] = TimestampTzGetDatum(boundary(anchor, &step, unit, calendar, idx));
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
