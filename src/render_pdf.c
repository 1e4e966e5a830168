/*-------------------------------------------------------------------------
 * render_pdf.c
 *	  The PDF invoice: a page layout of text that SQL has already formatted.
 *
 * Why libharu (Debian libhpdf-dev): a small, well-kept C library that writes
 * PDF with the 14 standard fonts and no other dependency than zlib, so
 * fluxrate carries no PDF code of its own.
 *
 * Division of labour: src/sql/75_render.sql decides every string (the money
 * exactly as stored, in the currency's minor unit, the dates, the labels), the
 * same strings its text and HTML renderers print; this file only places them
 * on A4 pages: a title, label/value pairs, a table whose first column is
 * wrapped and whose other columns are right-aligned, the totals under the
 * table, and notes.  So the three forms of an invoice cannot disagree on an
 * amount: they print one string.
 *
 * Memory: libharu allocates through the functions given to HPDF_NewEx; ours
 * are palloc in a context of this call, and libharu's error handler raises
 * with ereport.  Leaving libharu by longjmp is then safe: nothing it holds
 * lives outside the context, which the error cleanup (or we) delete.
 *
 * Text: the standard fonts carry WinAnsiEncoding (Windows-1252), which covers
 * Latin-1 and the usual typographic marks; any other character is printed as
 * "?" (the text and HTML invoices keep it).  The output is deterministic: no
 * creation date, no random file identifier.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <hpdf.h>

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "fluxrate.h"

#define PAGE_W		595.276f	/* A4 in points */
#define PAGE_H		841.89f
#define MARGIN		56.0f
#define BODY_SIZE	10.0f
#define LEAD		14.0f
#define COL_GAP		14.0f

static MemoryContext pdf_cxt = NULL;

static void *HPDF_STDCALL
PdfAlloc(HPDF_UINT size)
{
	return MemoryContextAlloc(pdf_cxt, size > 0 ? size : 1);
}

static void HPDF_STDCALL
PdfFree(void *p)
{
	if (p != NULL)
		pfree(p);
}

static void HPDF_STDCALL
PdfError(HPDF_STATUS error_no, HPDF_STATUS detail_no, void *user_data)
{
	/* reading the finished document to its end reports end-of-stream: not an error */
	if (error_no == HPDF_STREAM_EOF)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
			 errmsg("could not render the pdf invoice"),
			 errdetail("libharu error 0x%04X, detail %u.", (unsigned int) error_no, (unsigned int) detail_no)));
}

/* Windows-1252 bytes 0x80..0x9F and the code points they stand for */
static const uint16 cp1252_high[32] = {
	0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0, 0x017D, 0,
	0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178
};

/* A text datum (server encoding) as a NUL-terminated Windows-1252 string */
static char *
ToWinAnsi(text *t)
{
	char	   *cs = text_to_cstring(t);	/* NUL-terminated: the datum is not */
	char	   *utf8 = (char *) pg_server_to_any(cs, strlen(cs), PG_UTF8);
	const unsigned char *s = (const unsigned char *) utf8;
	char	   *out = palloc(strlen(utf8) + 1);
	int			o = 0;

	while (*s)
	{
		int			n = pg_utf_mblen(s);
		pg_wchar	cp = utf8_to_unicode(s);
		unsigned char b = '?';

		if (cp < 0x20 || cp == 0x7F)
			b = ' ';			/* a control character (newline, tab) is a space */
		else if (cp < 0x80 || (cp >= 0xA0 && cp <= 0xFF))
			b = (unsigned char) cp;
		else
			for (int i = 0; i < 32; i++)
				if (cp1252_high[i] != 0 && cp1252_high[i] == cp)
					b = (unsigned char) (0x80 + i);
		out[o++] = (char) b;
		/* never step past the terminator on a truncated sequence */
		for (int i = 0; i < n && *s; i++)
			s++;
	}
	out[o] = '\0';
	return out;
}

/* A text[] argument: its elements (NULL -> "") and its dimensions */
typedef struct
{
	char	  **v;
	int			rows;
	int			cols;
} Grid;

static Grid
GetGrid(FunctionCallInfo fcinfo, int argno, int want_cols, const char *name)
{
	Grid		g = {NULL, 0, 0};
	ArrayType  *a;
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	if (PG_ARGISNULL(argno))
		return g;
	a = PG_GETARG_ARRAYTYPE_P(argno);
	if (ARR_NDIM(a) == 0)
		return g;
	if (want_cols > 0 && (ARR_NDIM(a) != 2 || ARR_DIMS(a)[1] != want_cols))
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a two-dimensional array of %d columns", name, want_cols)));
	if (want_cols == 0 && ARR_NDIM(a) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", name)));
	deconstruct_array(a, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	g.v = palloc(sizeof(char *) * (n > 0 ? n : 1));
	for (int i = 0; i < n; i++)
		g.v[i] = nulls[i] ? pstrdup("") : ToWinAnsi(DatumGetTextPP(elems[i]));
	g.cols = want_cols > 0 ? want_cols : 1;
	g.rows = n / g.cols;
	return g;
}

typedef struct
{
	HPDF_Doc	pdf;
	HPDF_Page	page;
	HPDF_Font	regular;
	HPDF_Font	bold;
	float		y;				/* baseline of the next line */
	int			pages;
} Layout;

static void
NewPage(Layout *L)
{
	L->page = HPDF_AddPage(L->pdf);
	HPDF_Page_SetWidth(L->page, PAGE_W);
	HPDF_Page_SetHeight(L->page, PAGE_H);
	L->y = PAGE_H - MARGIN;
	L->pages++;
}

static void
Text(Layout *L, HPDF_Font font, float size, float x, const char *s)
{
	HPDF_Page_BeginText(L->page);
	HPDF_Page_SetFontAndSize(L->page, font, size);
	HPDF_Page_TextOut(L->page, x, L->y, s);
	HPDF_Page_EndText(L->page);
}

static float
Width(Layout *L, HPDF_Font font, float size, const char *s)
{
	HPDF_Page_SetFontAndSize(L->page, font, size);
	return HPDF_Page_TextWidth(L->page, s);
}

static void
TextRight(Layout *L, HPDF_Font font, float size, float right, const char *s)
{
	Text(L, font, size, right - Width(L, font, size, s), s);
}

static void
Rule(Layout *L, float x0, float x1, float y)
{
	HPDF_Page_SetLineWidth(L->page, 0.5f);
	HPDF_Page_MoveTo(L->page, x0, y);
	HPDF_Page_LineTo(L->page, x1, y);
	HPDF_Page_Stroke(L->page);
}

/* Room for `lines` more lines on this page, else a new page */
static bool
Need(Layout *L, int lines)
{
	if (L->y - LEAD * lines < MARGIN)
	{
		NewPage(L);
		return true;
	}
	return false;
}

/*
 * The widths of the table's columns: each right-aligned column is as wide as
 * its widest cell (header and totals included); the first takes the rest.
 */
static void
ColumnWidths(Layout *L, Grid *head, Grid *rows, Grid *totals, float *w)
{
	float		rest = PAGE_W - 2 * MARGIN;

	for (int c = 1; c < head->cols; c++)
	{
		w[c] = Width(L, L->bold, BODY_SIZE, head->v[c]);
		for (int r = 0; r < rows->rows; r++)
			w[c] = Max(w[c], Width(L, L->regular, BODY_SIZE, rows->v[r * rows->cols + c]));
		rest -= w[c] + COL_GAP;
	}
	/* the totals' values sit in the last column, their labels in the one before */
	for (int r = 0; r < totals->rows; r++)
		w[head->cols - 1] = Max(w[head->cols - 1], Width(L, L->bold, BODY_SIZE, totals->v[r * 2 + 1]));
	w[0] = Max(rest, 120.0f);
}

static void
TableHeader(Layout *L, Grid *head, float *w)
{
	float		x = MARGIN;

	for (int c = 0; c < head->cols; c++)
	{
		if (c == 0)
			Text(L, L->bold, BODY_SIZE, x, head->v[c]);
		else
			TextRight(L, L->bold, BODY_SIZE, x + w[c], head->v[c]);
		x += w[c] + COL_GAP;
	}
	Rule(L, MARGIN, PAGE_W - MARGIN, L->y - 4);
	L->y -= LEAD + 2;
}

/* The first `n` bytes of s that fit in width (at a space when there is one) */
static int
FitPrefix(Layout *L, const char *s, float width)
{
	HPDF_REAL	real;
	int			n;

	HPDF_Page_SetFontAndSize(L->page, L->regular, BODY_SIZE);
	n = (int) HPDF_Page_MeasureText(L->page, s, width, HPDF_TRUE, &real);
	if (n == 0)					/* one word wider than the column: cut it */
		n = (int) HPDF_Page_MeasureText(L->page, s, width, HPDF_FALSE, &real);
	return n > 0 ? n : 1;
}

/*
 * fluxrate_internal.render_pdf(title text, pairs text[][2], head text[], rows text[][],
 *		totals text[][2], notes text[]) RETURNS bytea
 * rows has as many columns as head; the last total is printed bold.
 */
PG_FUNCTION_INFO_V1(fr_render_pdf);
Datum
fr_render_pdf(PG_FUNCTION_ARGS)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "fluxrate pdf", ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	char	   *title = PG_ARGISNULL(0) ? pstrdup("Invoice") : ToWinAnsi(PG_GETARG_TEXT_PP(0));
	Grid		pairs = GetGrid(fcinfo, 1, 2, "pairs");
	Grid		head = GetGrid(fcinfo, 2, 0, "head");
	Grid		rows;
	Grid		totals = GetGrid(fcinfo, 4, 2, "totals");
	Grid		notes = GetGrid(fcinfo, 5, 0, "notes");
	Layout		L = {0};
	float	   *w;
	float		label_w = 0;
	HPDF_UINT32 size;
	bytea	   *result;

	if (head.rows < 2)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("head must name at least two columns")));
	rows = GetGrid(fcinfo, 3, head.rows, "rows");
	/* a row grid of the header's width: head is one-dimensional, its rows are columns */
	head.cols = head.rows;
	head.rows = 1;

	pdf_cxt = cxt;
	L.pdf = HPDF_NewEx(PdfError, PdfAlloc, PdfFree, 0, NULL);
	if (L.pdf == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a pdf document")));
	HPDF_SetCompressionMode(L.pdf, HPDF_COMP_ALL);
	HPDF_SetInfoAttr(L.pdf, HPDF_INFO_CREATOR, "fluxrate " FR_VERSION);
	HPDF_SetInfoAttr(L.pdf, HPDF_INFO_TITLE, title);
	L.regular = HPDF_GetFont(L.pdf, "Helvetica", "WinAnsiEncoding");
	L.bold = HPDF_GetFont(L.pdf, "Helvetica-Bold", "WinAnsiEncoding");
	NewPage(&L);

	Text(&L, L.bold, 20, MARGIN, title);
	L.y -= 34;
	for (int r = 0; r < pairs.rows; r++)
		label_w = Max(label_w, Width(&L, L.bold, BODY_SIZE, pairs.v[r * 2]));
	for (int r = 0; r < pairs.rows; r++)
	{
		Need(&L, 1);
		Text(&L, L.bold, BODY_SIZE, MARGIN, pairs.v[r * 2]);
		Text(&L, L.regular, BODY_SIZE, MARGIN + label_w + COL_GAP, pairs.v[r * 2 + 1]);
		L.y -= LEAD;
	}
	L.y -= LEAD;

	w = palloc0(sizeof(float) * head.cols);
	ColumnWidths(&L, &head, &rows, &totals, w);
	Need(&L, 3);
	TableHeader(&L, &head, w);
	for (int r = 0; r < rows.rows; r++)
	{
		const char *desc = rows.v[r * rows.cols];
		bool		first = true;

		/* the description wraps; the numbers go on its first line */
		do
		{
			int			n = FitPrefix(&L, desc, w[0]);
			char	   *part = pnstrdup(desc, n);

			if (Need(&L, 1))
				TableHeader(&L, &head, w);
			Text(&L, L.regular, BODY_SIZE, MARGIN, part);
			if (first)
			{
				float		x = MARGIN + w[0] + COL_GAP;

				for (int c = 1; c < rows.cols; c++)
				{
					TextRight(&L, L.regular, BODY_SIZE, x + w[c], rows.v[r * rows.cols + c]);
					x += w[c] + COL_GAP;
				}
				first = false;
			}
			L.y -= LEAD;
			desc += n;
			while (*desc == ' ')
				desc++;
		} while (*desc);
	}
	if (rows.rows == 0)
	{
		Text(&L, L.regular, BODY_SIZE, MARGIN, "(no lines)");
		L.y -= LEAD;
	}
	Rule(&L, MARGIN, PAGE_W - MARGIN, L.y + LEAD - 4);
	L.y -= 4;
	for (int r = 0; r < totals.rows; r++)
	{
		HPDF_Font	f = (r == totals.rows - 1) ? L.bold : L.regular;
		float		right = PAGE_W - MARGIN;

		Need(&L, 1);
		TextRight(&L, f, BODY_SIZE, right, totals.v[r * 2 + 1]);
		TextRight(&L, f, BODY_SIZE, right - w[head.cols - 1] - COL_GAP, totals.v[r * 2]);
		L.y -= LEAD;
	}
	L.y -= LEAD;
	for (int r = 0; r < notes.rows; r++)
	{
		const char *s = notes.v[r];

		while (*s)
		{
			int			n = FitPrefix(&L, s, PAGE_W - 2 * MARGIN);

			Need(&L, 1);
			Text(&L, L.regular, BODY_SIZE - 1, MARGIN, pnstrdup(s, n));
			L.y -= LEAD;
			s += n;
			while (*s == ' ')
				s++;
		}
	}

	HPDF_SaveToStream(L.pdf);
	size = HPDF_GetStreamSize(L.pdf);
	MemoryContextSwitchTo(old);
	result = (bytea *) palloc(VARHDRSZ + size);
	{
		HPDF_UINT32 got = size;

		MemoryContextSwitchTo(cxt);
		HPDF_ResetStream(L.pdf);
		HPDF_ReadFromStream(L.pdf, (HPDF_BYTE *) VARDATA(result), &got);
		MemoryContextSwitchTo(old);
		if (got != size)
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("could not read the rendered pdf invoice"),
					 errdetail("%u of %u bytes.", (unsigned int) got, (unsigned int) size)));
	}
	SET_VARSIZE(result, VARHDRSZ + size);
	HPDF_Free(L.pdf);
	pdf_cxt = NULL;
	MemoryContextDelete(cxt);
	PG_RETURN_BYTEA_P(result);
}
