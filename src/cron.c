/*-------------------------------------------------------------------------
 * cron.c
 *	  What fluxrate needs to know about pg_cron, its clock:
 *
 *	  fr_cron_connect_error()  opens the libpq connection pg_cron 1.4 opens for
 *	      a job when cron.use_background_workers is off -- host = cron.host,
 *	      port = this server's port, dbname = this database, user = the
 *	      current role, no password (libpq then looks in the server process's
 *	      environment and in the .pgpass of the operating-system user the
 *	      server runs as, exactly as it does in the pg_cron launcher, which is
 *	      forked from the same postmaster) -- and returns libpq's error, or
 *	      NULL when it logged in.  schedule_jobs() refuses to schedule jobs
 *	      that would fail every minute with "connection failed".  It takes no
 *	      arguments on purpose: it can only reach where pg_cron itself would.
 *
 *	  fr_job_log()  the one LOG line of a job run.
 *
 *	  fr_drop_extension_guard()  an event trigger on ddl_command_start for
 *	      DROP EXTENSION: when fluxrate is among the extensions dropped, it
 *	      calls fluxrate_internal.before_drop_extension() (unschedules the
 *	      jobs) while fluxrate still exists.  It must be ddl_command_start:
 *	      sql_drop fires after the drop, when this trigger, a member of the
 *	      extension, is gone.  Only C sees the statement's object names.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "libpq-fe.h"

#include "commands/dbcommands.h"
#include "commands/event_trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/postmaster.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "fluxrate.h"

/* how long the check waits for the server to answer the login */
#define FR_CRON_CONNECT_TIMEOUT_MS	10000

PG_FUNCTION_INFO_V1(fr_cron_connect_error);
PG_FUNCTION_INFO_V1(fr_cron_setting);
PG_FUNCTION_INFO_V1(fr_job_log);
PG_FUNCTION_INFO_V1(fr_drop_extension_guard);

/* libpq's message without its trailing newline, in palloc'd memory */
static text *
conn_error(PGconn *conn, const char *fallback)
{
	const char *msg = conn ? PQerrorMessage(conn) : NULL;
	int			len;

	if (msg == NULL || *msg == '\0')
		msg = fallback;
	len = strlen(msg);
	while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == ' '))
		len--;
	return cstring_to_text_with_len(msg, len);
}

Datum
fr_cron_connect_error(PG_FUNCTION_ARGS)
{
	const char *host = GetConfigOption("cron.host", true, false);
	char		port[12];
	const char *keywords[] = {"host", "port", "dbname", "user",
	"fallback_application_name", "client_encoding", NULL};
	const char *values[7];
	PGconn	   *volatile conn = NULL;
	text	   *volatile result = NULL;

	if (host == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pg_cron is not loaded"),
				 errhint("Add pg_cron to shared_preload_libraries and restart the server.")));
	snprintf(port, sizeof(port), "%d", PostPortNumber);
	values[0] = host;
	values[1] = port;
	values[2] = get_database_name(MyDatabaseId);
	values[3] = GetUserNameFromId(GetUserId(), false);
	values[4] = "fluxrate (pg_cron login check)";
	values[5] = GetDatabaseEncodingName();
	values[6] = NULL;

	/*
	 * Non-blocking, on our latch, so that a cancel or a shutdown interrupts
	 * the wait; PG_FINALLY closes the socket whatever happens.
	 */
	PG_TRY();
	{
		PostgresPollingStatusType st = PGRES_POLLING_WRITING;
		TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														   FR_CRON_CONNECT_TIMEOUT_MS);

		conn = PQconnectStartParams(keywords, values, false);
		if (conn == NULL || PQstatus(conn) == CONNECTION_BAD)
			st = PGRES_POLLING_FAILED;
		while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED)
		{
			int			wait_for = (st == PGRES_POLLING_READING) ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE;
			long		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
			int			rc;

			if (left <= 0)
			{
				result = cstring_to_text("timeout expired while logging in");
				break;
			}
			rc = WaitLatchOrSocket(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH | wait_for,
								   PQsocket(conn), left, PG_WAIT_EXTENSION);
			if (rc & WL_LATCH_SET)
			{
				ResetLatch(MyLatch);
				CHECK_FOR_INTERRUPTS();
			}
			if (rc & wait_for)
				st = PQconnectPoll(conn);
		}
		if (result == NULL && st != PGRES_POLLING_OK)
			result = conn_error(conn, "connection failed");
	}
	PG_FINALLY();
	{
		if (conn != NULL)
			PQfinish(conn);
	}
	PG_END_TRY();

	if (result == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(result);
}

/*
 * A pg_cron setting (cron.*), or NULL when pg_cron is not loaded.  pg_cron
 * makes its settings superuser-only to read; what they say about the clock
 * (the database the jobs run from, background workers or not, the host) is no
 * secret, and health() reports it as fluxrate_system.  Other settings are
 * refused: this is not a way around GUC_SUPERUSER_ONLY in general.
 */
Datum
fr_cron_setting(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	const char *value;

	if (strcmp(name, "cron.database_name") != 0 && strcmp(name, "cron.use_background_workers") != 0 &&
		strcmp(name, "cron.host") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("fluxrate reads only cron.database_name, cron.use_background_workers and cron.host")));
	value = GetConfigOption(name, true, false);
	if (value == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(value));
}

/*
 * The one line a job writes when it did something (fluxrate_internal.job_log):
 * "fluxrate: close_due_periods: closed 212 periods in 1.8 s", timed from the
 * start of the statement that called the job (for a job, pg_cron's command).
 * At LOG, as autovacuum and the checkpointer log theirs: the server log gets
 * it whoever runs the job, a client only when it asks (client_min_messages).
 * In C for errhidestmt/errhidecontext: one line, without the STATEMENT and
 * PL/pgSQL CONTEXT lines a RAISE LOG would add.
 */
Datum
fr_job_log(PG_FUNCTION_ARGS)
{
	char	   *job = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *did = text_to_cstring(PG_GETARG_TEXT_PP(1));
	long		secs;
	int			usecs;

	TimestampDifference(GetCurrentStatementStartTimestamp(), GetCurrentTimestamp(), &secs, &usecs);
	ereport(LOG,
			(errmsg("fluxrate: %s: %s in %.1f s", job, did, secs + usecs / 1000000.0),
			 errhidestmt(true),
			 errhidecontext(true)));
	PG_RETURN_VOID();
}

Datum
fr_drop_extension_guard(PG_FUNCTION_ARGS)
{
	EventTriggerData *trigdata;
	DropStmt   *stmt;
	ListCell   *lc;
	bool		ours = false;

	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("fluxrate_internal.drop_extension_guard() is an event trigger")));
	trigdata = (EventTriggerData *) fcinfo->context;
	if (trigdata->parsetree == NULL || !IsA(trigdata->parsetree, DropStmt))
		PG_RETURN_VOID();
	stmt = (DropStmt *) trigdata->parsetree;
	if (stmt->removeType != OBJECT_EXTENSION)
		PG_RETURN_VOID();
	foreach(lc, stmt->objects)
	{
		Node	   *name = (Node *) lfirst(lc);

		if (IsA(name, String) && strcmp(strVal(name), "fluxrate") == 0)
			ours = true;
	}
	if (!ours)
		PG_RETURN_VOID();

	SPI_connect();
	if (SPI_execute("SELECT fluxrate_internal.before_drop_extension()", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "fluxrate: before_drop_extension() failed");
	SPI_finish();
	PG_RETURN_VOID();
}
