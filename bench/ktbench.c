/*
 * ktbench: SMTP load generator for ktrelay and comparable servers.
 *
 * One thread, epoll, non-blocking sockets and a non-blocking OpenSSL client.
 * Every connection runs EHLO, optional STARTTLS, then M transactions of
 * MAIL / K x RCPT / DATA or BDAT LAST, optionally pipelined. Every reply code is
 * checked against what the step expects; anything else is counted as an error
 * and the first few replies are kept for the report. Latency is measured per
 * message from sending MAIL to the final reply. Server CPU and memory come
 * from /proc for the given pids, sampled before and after the run.
 *
 * Exit status: 0 when every message was accepted, 1 on errors, 2 on usage.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

enum mode { MODE_PLAIN, MODE_STARTTLS, MODE_TLS };

/* What the next reply on a connection answers. */
enum step {
	ST_GREETING, ST_EHLO, ST_STARTTLS, ST_MAIL, ST_RCPT, ST_DATA, ST_DOT,
	ST_BDAT, ST_RSET, ST_QUIT,
};


static const char *const step_names[] = {
	"greeting", "EHLO", "STARTTLS", "MAIL", "RCPT", "DATA", "end-of-data",
	"BDAT", "RSET", "QUIT",
};

struct opts {
	const char *host, *port, *from, *to, *cipher, *label, *pids_cmd;
	long connections, messages, size, rcpts, idle;
	double idle_settle;
	double duration_limit;
	enum mode mode;
	int tls_version; /* 0 = library default range, else 12 or 13 */
	bool bdat, pipelining, new_conn, csv, quickack;
	bool handshake_only; /* new connection, EHLO, STARTTLS, EHLO, QUIT: no mail */
	pid_t pids[64];
	int npids;
};

struct seg {
	const char *p;
	size_t len, off;
	char *owned; /* freed once written; NULL when p points at shared data */
};

enum cstate { CS_CONNECTING, CS_HANDSHAKE, CS_SMTP, CS_IDLE, CS_DONE };

struct conn {
	int fd, id;
	unsigned gen; /* bumped on close, so stale input is never parsed again */
	SSL *ssl;
	enum cstate state;
	bool tls_pending_after_starttls, has_pipelining, has_chunking, has_starttls;
	bool txn_failed;
	char *in;
	size_t in_len, in_cap;
	char stage[16384];
	size_t stage_len, stage_off;
	struct seg *out;
	size_t out_head, out_n, out_cap;
	enum step expect[256];
	unsigned exp_head, exp_n;
	long sent_msgs;   /* transactions started on this connection or slot */
	long done_msgs;   /* transactions finished (ok or failed) */
	long rcpt_ok, rcpt_sent;
	struct timespec t_mail;
	/* last reply, accumulated across continuation lines */
	char reply[512];
	int reply_code;
};

struct proc_sample {
	double cpu_s;    /* utime+stime+cutime+cstime, seconds */
	long rss_kb, pss_kb, hwm_kb;
	int nproc;
};

static const char csv_header[] =
	"label,mode,proto,connections,messages,msg_bytes,rcpts,cmd,pipelining,cipher,ok,failed,"
	"errors,handshakes,elapsed_s,msgs_s,mb_s,handshakes_s,p50_ms,p99_ms,max_ms,server_cpu_s,"
	"server_cpu_per_msg_s,server_hwm_kb,server_pss_kb,server_mem_delta_kb,idle_sessions,"
	"kb_per_idle_session";

static struct opts o = {
	.host = "127.0.0.1", .port = "25", .from = "bench@ktbench.test",
	.to = "user@bench.test", .connections = 1, .messages = 1, .size = 4096,
	.rcpts = 1, .idle_settle = 0.5, .mode = MODE_PLAIN, .label = "",
};

static SSL_CTX *g_ctx;
static int g_ep = -1;
static struct addrinfo *g_addr;
static char **g_rcpt;              /* one address per recipient slot */
static char *g_body_data, *g_body_raw;  /* dot-stuffed and raw body */
static size_t g_body_data_len, g_body_raw_len, g_hdr_len;
static long g_msg_bytes;           /* header + raw body, as the server stores it */

static long n_ok, n_fail, n_errors, n_conn, n_handshakes, n_conn_active, n_idle;
static char first_errors[5][300];
static int n_first_errors;
static uint32_t *g_lat_us;
static size_t g_lat_n, g_lat_cap;
static char g_proto[32], g_cipher_name[64];
static volatile sig_atomic_t g_stop;
static double g_last_progress;
#define STALL_SECONDS 30.0


static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p) {
		fprintf(stderr, "ktbench: out of memory\n");
		exit(2);
	}
	return p;
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p) {
		fprintf(stderr, "ktbench: out of memory\n");
		exit(2);
	}
	return p;
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
	va_list ap;
	char *s;

	va_start(ap, fmt);
	if (vasprintf(&s, fmt, ap) < 0) {
		fprintf(stderr, "ktbench: out of memory\n");
		exit(2);
	}
	va_end(ap);
	return s;
}

static void record_error(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void record_error(struct conn *c, const char *fmt, ...)
{
	va_list ap;

	n_errors++;
	if (n_first_errors >= 5)
		return;
	int k = snprintf(first_errors[n_first_errors], sizeof(first_errors[0]), "conn %d: ",
			 c ? c->id : -1);
	va_start(ap, fmt);
	vsnprintf(first_errors[n_first_errors] + k, sizeof(first_errors[0]) - k, fmt, ap);
	va_end(ap);
	n_first_errors++;
}

/* ---- message content ---- */

/*
 * The body is built once and shared by all messages: 76-character lines with
 * CRLF, with roughly one line in eight starting with '.' so that DATA's dot
 * stuffing is exercised. The raw copy goes out with BDAT, the stuffed one with
 * DATA, followed by the terminating ".\r\n".
 */
static void build_body(long body_len)
{
	static const char alphabet[] =
		"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,;:-_=+()";
	uint32_t seed = 12345;
	size_t cap = (size_t)body_len + 8;
	char *raw = xmalloc(cap);
	size_t n = 0;

	while ((long)n + 2 <= body_len) {
		size_t line = (size_t)body_len - n - 2;
		if (line > 76)
			line = 76;
		for (size_t i = 0; i < line; i++) {
			seed = seed * 1103515245u + 12345u;
			raw[n + i] = alphabet[(seed >> 16) % (sizeof(alphabet) - 1)];
		}
		seed = seed * 1103515245u + 12345u;
		if (line > 0 && (seed >> 16) % 8 == 0)
			raw[n] = '.';
		/* a line of just "." would end DATA early; stuffing handles it, but
		 * keep lines from ending in spaces that servers might trim */
		if (line > 0 && raw[n + line - 1] == ' ')
			raw[n + line - 1] = 'x';
		n += line;
		raw[n++] = '\r';
		raw[n++] = '\n';
	}
	g_body_raw = raw;
	g_body_raw_len = n;

	char *st = xmalloc(n + n / 76 + 8);
	size_t m = 0;
	bool bol = true;
	for (size_t i = 0; i < n; i++) {
		if (bol && raw[i] == '.')
			st[m++] = '.';
		st[m++] = raw[i];
		bol = raw[i] == '\n';
	}
	memcpy(st + m, ".\r\n", 3);
	m += 3;
	g_body_data = st;
	g_body_data_len = m;
}

static char *make_header(struct conn *c)
{
	static unsigned long serial;
	char date[64];
	time_t t = time(NULL);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
	unsigned long n = serial++;
	return xasprintf("From: <%s>\r\nTo: <%s>\r\nSubject: ktbench %06d %010lu\r\n"
			 "Date: %s\r\nMessage-ID: <%010lu.%06d.%010ld@ktbench.test>\r\n"
			 "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
			 o.from, g_rcpt[0], c->id, n, date, n, c->id, (long)getpid());
}

/* ---- output queue ---- */

static void push_seg(struct conn *c, const char *p, size_t len, char *owned)
{
	if (c->out_head + c->out_n == c->out_cap) {
		if (c->out_head > 0) {
			memmove(c->out, c->out + c->out_head, c->out_n * sizeof(*c->out));
			c->out_head = 0;
		} else {
			c->out_cap = c->out_cap ? c->out_cap * 2 : 8;
			c->out = xrealloc(c->out, c->out_cap * sizeof(*c->out));
		}
	}
	c->out[c->out_head + c->out_n++] = (struct seg){ .p = p, .len = len, .owned = owned };
}

static void push_str(struct conn *c, char *s)
{
	push_seg(c, s, strlen(s), s);
}

static void expect(struct conn *c, enum step s)
{
	if (c->exp_n == sizeof(c->expect) / sizeof(c->expect[0])) {
		fprintf(stderr, "ktbench: too many outstanding replies\n");
		exit(2);
	}
	c->expect[(c->exp_head + c->exp_n++) % 256] = s;
}

/* ---- connection life cycle ---- */

static struct conn *g_conns;

static void conn_close(struct conn *c)
{
	if (c->fd < 0)
		return;
	if (c->ssl)
		SSL_free(c->ssl);
	c->ssl = NULL;
	close(c->fd);
	c->fd = -1;
	c->gen++;
	for (size_t i = 0; i < c->out_n; i++)
		free(c->out[c->out_head + i].owned);
	c->out_head = c->out_n = 0;
	c->stage_len = c->stage_off = 0;
	c->in_len = 0;
	c->exp_head = c->exp_n = 0;
	n_conn_active--;
}

static int conn_open(struct conn *c)
{
	int fd = socket(g_addr->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int one = 1;

	if (fd < 0) {
		record_error(c, "socket: %s", strerror(errno));
		return -1;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, g_addr->ai_addr, g_addr->ai_addrlen) < 0 && errno != EINPROGRESS) {
		record_error(c, "connect: %s", strerror(errno));
		close(fd);
		return -1;
	}
	struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP,
				  .data.ptr = c };
	if (epoll_ctl(g_ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		record_error(c, "epoll_ctl: %s", strerror(errno));
		close(fd);
		return -1;
	}
	c->fd = fd;
	c->state = CS_CONNECTING;
	if (o.handshake_only) /* the "message" of this mode is the connection */
		clock_gettime(CLOCK_MONOTONIC, &c->t_mail);
	c->has_pipelining = c->has_chunking = c->has_starttls = false;
	n_conn++;
	n_conn_active++;
	return 0;
}

static int start_tls(struct conn *c)
{
	c->ssl = SSL_new(g_ctx);
	if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) {
		record_error(c, "SSL_new failed");
		return -1;
	}
	SSL_set_tlsext_host_name(c->ssl, o.host);
	SSL_set_connect_state(c->ssl);
	/* a socket still connecting moves to the handshake once connected */
	if (c->state != CS_CONNECTING)
		c->state = CS_HANDSHAKE;
	return 0;
}

/* Marks every message this connection still owes as failed and stops it. */
static void conn_fail(struct conn *c)
{
	long owe = o.idle ? 0 : o.messages - c->done_msgs;

	if (owe > 0)
		n_fail += owe;
	c->done_msgs = o.messages;
	conn_close(c);
	c->state = CS_DONE;
}

static void send_ehlo(struct conn *c)
{
	push_str(c, xasprintf("EHLO ktbench.test\r\n"));
	expect(c, ST_EHLO);
}

static void begin_message(struct conn *c);

static void send_quit(struct conn *c)
{
	push_str(c, xasprintf("QUIT\r\n"));
	expect(c, ST_QUIT);
}

static void send_payload(struct conn *c, bool bdat)
{
	char *hdr = make_header(c);
	size_t hlen = strlen(hdr);

	if (bdat) {
		char *cmd = xasprintf("BDAT %zu LAST\r\n", hlen + g_body_raw_len);
		push_str(c, cmd);
		push_seg(c, hdr, hlen, hdr);
		push_seg(c, g_body_raw, g_body_raw_len, NULL);
	} else {
		push_seg(c, hdr, hlen, hdr);
		push_seg(c, g_body_data, g_body_data_len, NULL);
	}
}

/* After the recipients: the message itself, as one BDAT LAST chunk or DATA (its 354 then sends it). */
static void start_body(struct conn *c)
{
	if (o.bdat) {
		send_payload(c, true);
		expect(c, ST_BDAT);
	} else {
		push_str(c, xasprintf("DATA\r\n"));
		expect(c, ST_DATA);
	}
}

static void begin_message(struct conn *c)
{
	if (g_stop || c->sent_msgs >= o.messages) {
		send_quit(c);
		return;
	}
	c->sent_msgs++;
	c->txn_failed = false;
	c->rcpt_ok = 0;
	c->rcpt_sent = 0;
	clock_gettime(CLOCK_MONOTONIC, &c->t_mail);
	bool pipe = o.pipelining && c->has_pipelining;
	push_str(c, xasprintf("MAIL FROM:<%s>\r\n", o.from));
	expect(c, ST_MAIL);
	if (!pipe)
		return;
	for (long i = 0; i < o.rcpts; i++) {
		push_str(c, xasprintf("RCPT TO:<%s>\r\n", g_rcpt[i]));
		expect(c, ST_RCPT);
	}
	c->rcpt_sent = o.rcpts;
	start_body(c);
}

static void finish_message(struct conn *c, bool ok)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	c->done_msgs++;
	if (!ok) {
		n_fail++;
	} else {
		n_ok++;
		if (g_lat_n == g_lat_cap) {
			g_lat_cap = g_lat_cap ? g_lat_cap * 2 : 4096;
			g_lat_us = xrealloc(g_lat_us, g_lat_cap * sizeof(*g_lat_us));
		}
		double us = (t.tv_sec - c->t_mail.tv_sec) * 1e6 +
			    (t.tv_nsec - c->t_mail.tv_nsec) / 1e3;
		g_lat_us[g_lat_n++] = us > 4e9 ? 4000000000u : (uint32_t)us;
	}
	if (o.new_conn) {
		send_quit(c);
		return;
	}
	if (!ok) {
		/* a server may keep a failed transaction open; close it first */
		push_str(c, xasprintf("RSET\r\n"));
		expect(c, ST_RSET);
		return;
	}
	begin_message(c);
}

/* Notes the EHLO keywords the client acts on. */
static void parse_ehlo_line(struct conn *c, const char *line, size_t len)
{
	if (len < 4)
		return;
	const char *kw = line + 4;
	size_t kl = len - 4;

	if (kl >= 10 && !strncasecmp(kw, "PIPELINING", 10))
		c->has_pipelining = true;
	else if (kl >= 8 && !strncasecmp(kw, "CHUNKING", 8))
		c->has_chunking = true;
	else if (kl >= 8 && !strncasecmp(kw, "STARTTLS", 8))
		c->has_starttls = true;
}

static void on_reply(struct conn *c, int code)
{
	if (c->exp_n == 0) {
		record_error(c, "unexpected reply: %s", c->reply);
		conn_fail(c);
		return;
	}
	enum step s = c->expect[c->exp_head];
	c->exp_head = (c->exp_head + 1) % 256;
	c->exp_n--;
	bool pipe = o.pipelining && c->has_pipelining;

	switch (s) {
	case ST_GREETING:
		if (code != 220)
			goto bad;
		send_ehlo(c);
		return;
	case ST_EHLO:
		if (code != 250)
			goto bad;
		if (o.mode == MODE_STARTTLS && !c->ssl) {
			if (!c->has_starttls) {
				record_error(c, "server does not advertise STARTTLS");
				conn_fail(c);
				return;
			}
			push_str(c, xasprintf("STARTTLS\r\n"));
			expect(c, ST_STARTTLS);
			return;
		}
		if (o.bdat && !c->has_chunking) {
			record_error(c, "server does not advertise CHUNKING");
			conn_fail(c);
			return;
		}
		if (o.idle) {
			c->state = CS_IDLE;
			n_idle++;
			return;
		}
		if (o.handshake_only) {
			/* one completed handshake (or plain EHLO) counts as one message */
			c->sent_msgs++;
			finish_message(c, true);
			return;
		}
		begin_message(c);
		return;
	case ST_STARTTLS:
		if (code != 220)
			goto bad;
		/* The handshake starts once the reply is consumed: nothing may
		 * be queued after STARTTLS, so the input buffer must be empty. */
		c->tls_pending_after_starttls = true;
		return;
	case ST_MAIL:
		if (code != 250) {
			record_error(c, "MAIL: %s", c->reply);
			c->txn_failed = true;
			if (!pipe)
				finish_message(c, false);
			return;
		}
		if (!pipe) {
			push_str(c, xasprintf("RCPT TO:<%s>\r\n", g_rcpt[0]));
			expect(c, ST_RCPT);
			c->rcpt_sent = 1;
		}
		return;
	case ST_RCPT:
		if (code != 250 && code != 251) {
			record_error(c, "RCPT: %s", c->reply);
			c->txn_failed = true;
		} else {
			c->rcpt_ok++;
		}
		if (pipe)
			return;
		if (c->rcpt_sent < o.rcpts) {
			push_str(c, xasprintf("RCPT TO:<%s>\r\n", g_rcpt[c->rcpt_sent++]));
			expect(c, ST_RCPT);
			return;
		}
		if (c->rcpt_ok == 0) {
			finish_message(c, false);
			return;
		}
		start_body(c);
		return;
	case ST_DATA:
		if (code == 354) {
			send_payload(c, false);
			expect(c, ST_DOT);
			return;
		}
		if (!c->txn_failed)
			record_error(c, "DATA: %s", c->reply);
		finish_message(c, false);
		return;
	case ST_DOT:
	case ST_BDAT:
		if (code != 250) {
			record_error(c, "%s: %s", step_names[s], c->reply);
			finish_message(c, false);
			return;
		}
		finish_message(c, !c->txn_failed);
		return;
	case ST_RSET:
		if (code != 250)
			goto bad;
		begin_message(c);
		return;
	case ST_QUIT:
		if (code != 221)
			record_error(c, "QUIT: %s", c->reply);
		conn_close(c);
		if (o.new_conn && !g_stop && c->sent_msgs < o.messages) {
			if (conn_open(c) < 0 || (o.mode == MODE_TLS && start_tls(c) < 0)) {
				conn_fail(c);
				return;
			}
			expect(c, ST_GREETING);
			return;
		}
		c->state = CS_DONE;
		return;
	}
	return;
bad:
	record_error(c, "%s: %s", step_names[s], c->reply);
	conn_fail(c);
}

/* Splits the input buffer into reply lines; returns false once c is closed. */
static bool process_input(struct conn *c)
{
	size_t start = 0;
	unsigned gen = c->gen;

	while (c->fd >= 0 && c->gen == gen) {
		char *nl = memchr(c->in + start, '\n', c->in_len - start);
		if (!nl)
			break;
		size_t len = (size_t)(nl - (c->in + start));
		char *line = c->in + start;
		if (len > 0 && line[len - 1] == '\r')
			len--;
		start = (size_t)(nl - c->in) + 1;
		if (len < 3 || !isdigit((unsigned char)line[0]) || !isdigit((unsigned char)line[1]) ||
		    !isdigit((unsigned char)line[2]) || (len > 3 && line[3] != ' ' && line[3] != '-')) {
			snprintf(c->reply, sizeof(c->reply), "%.*s", (int)(len > 200 ? 200 : len), line);
			record_error(c, "malformed reply: %s", c->reply);
			conn_fail(c);
			return false;
		}
		if (c->exp_n > 0 && c->expect[c->exp_head] == ST_EHLO)
			parse_ehlo_line(c, line, len);
		if (len > 3 && line[3] == '-')
			continue;
		snprintf(c->reply, sizeof(c->reply), "%.*s", (int)(len > 400 ? 400 : len), line);
		c->reply_code = atoi(line);
		g_last_progress = now_s();
		on_reply(c, c->reply_code);
		if (c->tls_pending_after_starttls) {
			c->tls_pending_after_starttls = false;
			if (start < c->in_len) {
				record_error(c, "data after STARTTLS reply");
				conn_fail(c);
				return false;
			}
			c->in_len = 0;
			if (start_tls(c) < 0) {
				conn_fail(c);
				return false;
			}
			return true;
		}
	}
	if (c->fd < 0 || c->gen != gen)
		return false;
	memmove(c->in, c->in + start, c->in_len - start);
	c->in_len -= start;
	return true;
}

static const char *ssl_err_string(void)
{
	static char buf[256];
	unsigned long e = ERR_get_error();

	if (!e)
		return "no detail";
	ERR_error_string_n(e, buf, sizeof(buf));
	ERR_clear_error();
	return buf;
}

/* Returns 1 on progress, 0 when blocked, -1 when the connection failed. */
static int do_handshake(struct conn *c)
{
	ERR_clear_error();
	int r = SSL_do_handshake(c->ssl);
	if (r == 1) {
		c->state = CS_SMTP;
		n_handshakes++;
		if (!g_proto[0]) {
			snprintf(g_proto, sizeof(g_proto), "%s", SSL_get_version(c->ssl));
			snprintf(g_cipher_name, sizeof(g_cipher_name), "%s",
				 SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)));
		}
		if (o.mode == MODE_STARTTLS)
			send_ehlo(c);
		return 1;
	}
	int e = SSL_get_error(c->ssl, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
		return 0;
	record_error(c, "TLS handshake: %s", ssl_err_string());
	return -1;
}

static void pop_written(struct conn *c, size_t n)
{
	while (n > 0 && c->out_n > 0) {
		struct seg *s = &c->out[c->out_head];
		size_t k = s->len - s->off < n ? s->len - s->off : n;
		s->off += k;
		n -= k;
		if (s->off == s->len) {
			free(s->owned);
			c->out_head++;
			c->out_n--;
		}
	}
	if (c->out_n == 0)
		c->out_head = 0;
}

/*
 * Small pieces (commands, headers, the start of a body) go out together, so
 * the server sees one packet or one TLS record rather than one per piece: a
 * client that trickles small segments would measure Nagle and delayed ACKs.
 */
static int flush_plain(struct conn *c)
{
	while (c->out_n > 0) {
		struct iovec iov[64];
		int n = 0;
		for (size_t i = 0; i < c->out_n && n < 64; i++) {
			struct seg *s = &c->out[c->out_head + i];
			iov[n].iov_base = (char *)s->p + s->off;
			iov[n++].iov_len = s->len - s->off;
		}
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return 0;
			record_error(c, "send: %s", strerror(errno));
			return -1;
		}
		pop_written(c, (size_t)w);
	}
	return 0;
}

/*
 * TLS: queued bytes are staged into one buffer of up to 16 KB (one record)
 * unless the next segment is large on its own. A write that would block is
 * retried with the same staged bytes, as OpenSSL requires.
 */
static int flush_tls(struct conn *c)
{
	for (;;) {
		const char *p;
		size_t len;
		bool staged = c->stage_len > 0;

		if (!staged) {
			if (c->out_n == 0)
				return 0;
			struct seg *h = &c->out[c->out_head];
			if (h->len - h->off >= sizeof(c->stage) || c->out_n == 1) {
				p = h->p + h->off;
				len = h->len - h->off;
			} else {
				for (size_t i = 0; i < c->out_n && c->stage_len < sizeof(c->stage); i++) {
					struct seg *s = &c->out[c->out_head + i];
					size_t k = s->len - s->off;
					if (k > sizeof(c->stage) - c->stage_len)
						k = sizeof(c->stage) - c->stage_len;
					memcpy(c->stage + c->stage_len, s->p + s->off, k);
					c->stage_len += k;
				}
				pop_written(c, c->stage_len);
				c->stage_off = 0;
				staged = true;
			}
		}
		if (staged) {
			p = c->stage + c->stage_off;
			len = c->stage_len - c->stage_off;
		}
		ERR_clear_error();
		int r = SSL_write(c->ssl, p, len > (1 << 30) ? (1 << 30) : (int)len);
		if (r <= 0) {
			int e = SSL_get_error(c->ssl, r);
			if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
				return 0;
			record_error(c, "TLS write: %s", ssl_err_string());
			return -1;
		}
		if (staged) {
			c->stage_off += (size_t)r;
			if (c->stage_off == c->stage_len)
				c->stage_len = c->stage_off = 0;
		} else {
			pop_written(c, (size_t)r);
		}
	}
}

static int flush_out(struct conn *c)
{
	return c->ssl ? flush_tls(c) : flush_plain(c);
}

/* Reads what is available; returns 1 on data, 0 when blocked, -1 on EOF/error. */
static int read_in(struct conn *c)
{
	if (c->in_cap - c->in_len < 4096) {
		c->in_cap = c->in_cap ? c->in_cap * 2 : 16384;
		c->in = xrealloc(c->in, c->in_cap);
	}
	size_t room = c->in_cap - c->in_len;
	ssize_t n;

	if (c->ssl) {
		ERR_clear_error();
		int r = SSL_read(c->ssl, c->in + c->in_len, (int)room);
		if (r <= 0) {
			int e = SSL_get_error(c->ssl, r);
			if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
				return 0;
			record_error(c, "TLS read: %s",
				     e == SSL_ERROR_ZERO_RETURN ? "closed by server" : ssl_err_string());
			return -1;
		}
		n = r;
	} else {
		n = recv(c->fd, c->in + c->in_len, room, 0);
		if (n == 0) {
			record_error(c, "connection closed by server");
			return -1;
		}
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return 0;
			record_error(c, "recv: %s", strerror(errno));
			return -1;
		}
	}
	c->in_len += (size_t)n;
	if (o.quickack) {
		int one = 1;
		setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
	}
	return 1;
}

/* The result r of a step that may have to wait (the handshake, a read): below 0 the connection fails,
 * 0 waits for the next event. True when the connection goes on. */
static int goes_on(struct conn *c, int r)
{
	if (r < 0)
		conn_fail(c);
	return r > 0;
}

/* Drives a connection as far as it goes without blocking. */
static void drive(struct conn *c)
{
	/* edge-triggered: keep going until the socket would block */
	while (c->fd >= 0) {
		if (c->state == CS_CONNECTING) {
			int err = 0;
			socklen_t sl = sizeof(err);
			getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl);
			if (err) {
				record_error(c, "connect: %s", strerror(err));
				conn_fail(c);
				return;
			}
			struct sockaddr_storage ss;
			sl = sizeof(ss);
			if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) < 0)
				return; /* still connecting */
			c->state = c->ssl ? CS_HANDSHAKE : CS_SMTP;
		}
		if (c->state == CS_HANDSHAKE && !goes_on(c, do_handshake(c)))
			return;
		if (flush_out(c) < 0) {
			conn_fail(c);
			return;
		}
		if (!goes_on(c, read_in(c)))
			return;
		if (!process_input(c))
			return;
	}
}

/* ---- /proc sampling ---- */

static void collect_pids(pid_t *pids, int *n)
{
	*n = 0;
	for (int i = 0; i < o.npids && *n < 4096; i++)
		pids[(*n)++] = o.pids[i];
	if (!o.pids_cmd)
		return;
	FILE *f = popen(o.pids_cmd, "r");
	if (!f)
		return;
	long p;
	while (*n < 4096 && fscanf(f, "%ld", &p) == 1)
		pids[(*n)++] = (pid_t)p;
	pclose(f);
}

static long status_kb(const char *buf, const char *key)
{
	const char *p = strstr(buf, key);

	return p ? strtol(p + strlen(key), NULL, 10) : 0;
}

static void sample_procs(struct proc_sample *ps)
{
	static pid_t pids[4096];
	int n;
	long tck = sysconf(_SC_CLK_TCK);
	char path[64], buf[8192];

	memset(ps, 0, sizeof(*ps));
	collect_pids(pids, &n);
	for (int i = 0; i < n; i++) {
		snprintf(path, sizeof(path), "/proc/%d/stat", (int)pids[i]);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		size_t len = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
		buf[len] = 0;
		/* the command name may hold spaces: fields start after the last ')' */
		char *p = strrchr(buf, ')');
		if (!p)
			continue;
		unsigned long ut, st;
		long cut, cst;
		if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %ld %ld",
			   &ut, &st, &cut, &cst) != 4)
			continue;
		ps->cpu_s += (double)(ut + st + (unsigned long)cut + (unsigned long)cst) / tck;
		ps->nproc++;
		snprintf(path, sizeof(path), "/proc/%d/status", (int)pids[i]);
		if ((f = fopen(path, "r"))) {
			len = fread(buf, 1, sizeof(buf) - 1, f);
			fclose(f);
			buf[len] = 0;
			ps->rss_kb += status_kb(buf, "VmRSS:");
			ps->hwm_kb += status_kb(buf, "VmHWM:");
		}
		snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", (int)pids[i]);
		if ((f = fopen(path, "r"))) {
			len = fread(buf, 1, sizeof(buf) - 1, f);
			fclose(f);
			buf[len] = 0;
			ps->pss_kb += status_kb(buf, "\nPss:");
		}
	}
}

/* ---- setup and report ---- */

static void usage(void)
{
	fprintf(stderr,
		"usage: ktbench [--host H] [--port N] [--connections N] [--messages M]\n"
		"  [--size BYTES] [--rcpts K] [--mode plain|starttls|tls] [--tls-version 1.2|1.3]\n"
		"  [--cipher NAME] [--bdat] [--pipelining] [--new-connection-per-message]\n"
		"  [--from ADDR] [--to ADDR[,ADDR...]] [--idle N] [--idle-settle S] [--duration-limit S]\n"
		"  [--server-pid PID[,PID...]] [--server-pids-cmd CMD] [--csv] [--csv-header]\n"
		"  [--label TEXT] [--quickack] [--handshake-only]\n");
	exit(2);
}

static long num_arg(const char *name, const char *s, long min)
{
	char *end;
	long v = strtol(s, &end, 10);

	if (*s == 0 || *end != 0 || v < min) {
		fprintf(stderr, "ktbench: bad value for --%s: %s\n", name, s);
		exit(2);
	}
	return v;
}

static void parse_args(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "host", 1, 0, 'h' }, { "port", 1, 0, 'p' }, { "connections", 1, 0, 'c' },
		{ "messages", 1, 0, 'm' }, { "size", 1, 0, 's' }, { "rcpts", 1, 0, 'r' },
		{ "mode", 1, 0, 'M' }, { "tls-version", 1, 0, 'V' }, { "cipher", 1, 0, 'C' },
		{ "bdat", 0, 0, 'B' }, { "pipelining", 0, 0, 'P' },
		{ "new-connection-per-message", 0, 0, 'N' }, { "from", 1, 0, 'f' },
		{ "to", 1, 0, 't' }, { "idle", 1, 0, 'i' }, { "idle-settle", 1, 0, 'I' }, { "duration-limit", 1, 0, 'd' },
		{ "server-pid", 1, 0, 'S' }, { "server-pids-cmd", 1, 0, 'X' },
		{ "csv", 0, 0, 'v' }, { "quickack", 0, 0, 'Q' }, { "csv-header", 0, 0, 'H' }, { "label", 1, 0, 'l' },
		{ "handshake-only", 0, 0, 'O' }, { "help", 0, 0, '?' },
		{ 0, 0, 0, 0 },
	};
	int ch;

	while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (ch) {
		case 'h': o.host = optarg; break;
		case 'p': o.port = optarg; break;
		case 'c': o.connections = num_arg("connections", optarg, 1); break;
		case 'm': o.messages = num_arg("messages", optarg, 0); break;
		case 's': o.size = num_arg("size", optarg, 0); break;
		case 'r': o.rcpts = num_arg("rcpts", optarg, 1); break;
		case 'i': o.idle = num_arg("idle", optarg, 1); break;
		case 'I': o.idle_settle = atof(optarg); break;
		case 'M':
			if (!strcmp(optarg, "plain"))
				o.mode = MODE_PLAIN;
			else if (!strcmp(optarg, "starttls"))
				o.mode = MODE_STARTTLS;
			else if (!strcmp(optarg, "tls"))
				o.mode = MODE_TLS;
			else
				usage();
			break;
		case 'V':
			if (!strcmp(optarg, "1.2"))
				o.tls_version = 12;
			else if (!strcmp(optarg, "1.3"))
				o.tls_version = 13;
			else
				usage();
			break;
		case 'C': o.cipher = optarg; break;
		case 'B': o.bdat = true; break;
		case 'P': o.pipelining = true; break;
		case 'N': o.new_conn = true; break;
		case 'f': o.from = optarg; break;
		case 't': o.to = optarg; break;
		case 'd': o.duration_limit = atof(optarg); break;
		case 'S': {
			char *dup = strdup(optarg), *save = NULL;
			for (char *t = strtok_r(dup, ",", &save); t && o.npids < 64;
			     t = strtok_r(NULL, ",", &save))
				o.pids[o.npids++] = (pid_t)num_arg("server-pid", t, 1);
			free(dup);
			break;
		}
		case 'X': o.pids_cmd = optarg; break;
		case 'v': o.csv = true; break;
		case 'Q': o.quickack = true; break;
		case 'H': puts(csv_header); exit(0);
		case 'l': o.label = optarg; break;
		case 'O': o.handshake_only = true; o.new_conn = true; break;
		default: usage();
		}
	}
	if (optind != argc)
		usage();
	if (o.rcpts > 200) {
		fprintf(stderr, "ktbench: --rcpts is limited to 200\n");
		exit(2);
	}
}

/* Recipient i: the i-th entry of a comma list, or local+i@domain from one address. */
static void build_rcpts(void)
{
	char *list = strdup(o.to), *save = NULL;
	char *items[200];
	int n = 0;

	for (char *t = strtok_r(list, ",", &save); t && n < 200; t = strtok_r(NULL, ",", &save))
		items[n++] = t;
	if (n == 0) {
		fprintf(stderr, "ktbench: empty --to\n");
		exit(2);
	}
	g_rcpt = xmalloc(sizeof(char *) * (size_t)o.rcpts);
	for (long i = 0; i < o.rcpts; i++) {
		if (n > 1 || o.rcpts == 1) {
			g_rcpt[i] = strdup(items[i % n]);
			continue;
		}
		const char *at = strchr(items[0], '@');
		int ll = at ? (int)(at - items[0]) : (int)strlen(items[0]);
		g_rcpt[i] = xasprintf("%.*s+%ld%s", ll, items[0], i + 1, at ? at : "");
	}
	free(list);
}

static void setup_tls(void)
{
	g_ctx = SSL_CTX_new(TLS_client_method());
	if (!g_ctx) {
		fprintf(stderr, "ktbench: SSL_CTX_new failed\n");
		exit(2);
	}
	/* benchmark targets use self-signed certificates */
	SSL_CTX_set_verify(g_ctx, SSL_VERIFY_NONE, NULL);
	SSL_CTX_set_session_cache_mode(g_ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_mode(g_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
				SSL_MODE_RELEASE_BUFFERS);
	if (o.tls_version) {
		int v = o.tls_version == 12 ? TLS1_2_VERSION : TLS1_3_VERSION;
		SSL_CTX_set_min_proto_version(g_ctx, v);
		SSL_CTX_set_max_proto_version(g_ctx, v);
	}
	if (o.cipher) {
		int ok = o.tls_version == 13 ? SSL_CTX_set_ciphersuites(g_ctx, o.cipher)
					     : SSL_CTX_set_cipher_list(g_ctx, o.cipher);
		if (!ok) {
			fprintf(stderr, "ktbench: cipher '%s' rejected\n", o.cipher);
			exit(2);
		}
	}
}

static void raise_nofile(long need)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || (long)rl.rlim_cur >= need)
		return;
	rl.rlim_cur = (rlim_t)need > rl.rlim_max ? rl.rlim_max : (rlim_t)need;
	setrlimit(RLIMIT_NOFILE, &rl);
	if ((long)rl.rlim_cur < need)
		fprintf(stderr, "ktbench: warning: fd limit %ld is below %ld\n", (long)rl.rlim_cur, need);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

static double pct(double p)
{
	if (g_lat_n == 0)
		return 0;
	size_t i = (size_t)(p * (double)(g_lat_n - 1) + 0.5);
	return g_lat_us[i] / 1000.0;
}

static void on_signal(int sig)
{
	(void)sig;
	g_stop = 1;
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	build_rcpts();
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);

	struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
	int gai = getaddrinfo(o.host, o.port, &hints, &g_addr);
	if (gai) {
		fprintf(stderr, "ktbench: %s:%s: %s\n", o.host, o.port, gai_strerror(gai));
		return 2;
	}
	if (o.mode != MODE_PLAIN)
		setup_tls();

	/* header length is fixed by the formats above; the body makes up the rest */
	struct conn probe = { .id = 0 };
	g_body_raw = "";
	char *h = make_header(&probe);
	g_hdr_len = strlen(h);
	free(h);
	build_body(o.size > (long)g_hdr_len ? o.size - (long)g_hdr_len : 0);
	g_msg_bytes = (long)(g_hdr_len + g_body_raw_len);

	long nconn = o.idle ? o.idle : o.connections;
	raise_nofile(nconn + 64);
	g_ep = epoll_create1(EPOLL_CLOEXEC);
	g_conns = calloc((size_t)nconn, sizeof(*g_conns));
	if (g_ep < 0 || !g_conns) {
		perror("ktbench: setup");
		return 2;
	}

	struct proc_sample before, after, at_idle;
	sample_procs(&before);
	double t0 = now_s(), t_end;
	g_last_progress = t0;
	double deadline = o.duration_limit > 0 ? t0 + o.duration_limit : 0;

	for (long i = 0; i < nconn; i++) {
		struct conn *c = &g_conns[i];
		c->id = (int)i;
		c->fd = -1;
		if (o.messages == 0 && !o.idle) {
			c->state = CS_DONE;
			continue;
		}
		if (conn_open(c) < 0 || (o.mode == MODE_TLS && start_tls(c) < 0)) {
			conn_fail(c);
			continue;
		}
		expect(c, ST_GREETING);
	}

	struct epoll_event evs[256];
	bool stopping = false;
	while (n_conn_active > 0) {
		if (o.idle && n_idle + (n_conn - n_conn_active) >= o.idle)
			break;
		int timeout = 200;
		int n = epoll_wait(g_ep, evs, 256, timeout);
		if (n < 0 && errno != EINTR) {
			perror("ktbench: epoll_wait");
			break;
		}
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			if (c->fd >= 0)
				drive(c);
		}
		if (deadline && now_s() > deadline && !stopping) {
			/* stop starting messages; give in-flight ones a short grace */
			g_stop = 1;
			stopping = true;
			deadline = now_s() + 5;
			if (o.idle)
				break;
		} else if (stopping && now_s() > deadline) {
			for (long i = 0; i < nconn; i++)
				if (g_conns[i].fd >= 0 && g_conns[i].state != CS_IDLE) {
					record_error(&g_conns[i], "timed out waiting for the server");
					conn_fail(&g_conns[i]);
				}
			break;
		}
		if (now_s() - g_last_progress > STALL_SECONDS) {
			for (long i = 0; i < nconn; i++)
				if (g_conns[i].fd >= 0 && g_conns[i].state != CS_IDLE) {
					record_error(&g_conns[i], "no reply from the server for %.0f s",
						     STALL_SECONDS);
					conn_fail(&g_conns[i]);
				}
			break;
		}
		if (g_stop && !stopping) {
			stopping = true;
			deadline = now_s() + 5;
		}
	}
	t_end = now_s();
	if (o.idle) {
		/* let the server settle its per-session state (and its allocator
		 * return the handshakes' transient memory) before measuring */
		usleep((useconds_t)(o.idle_settle * 1e6));
		sample_procs(&at_idle);
		after = at_idle;
	} else {
		sample_procs(&after);
	}
	double el = t_end - t0;
	long idle_reached = n_idle;
	for (long i = 0; i < nconn; i++) {
		conn_close(&g_conns[i]);
		free(g_conns[i].in);
		free(g_conns[i].out);
	}
	free(g_conns);

	if (g_lat_n)
		qsort(g_lat_us, g_lat_n, sizeof(*g_lat_us), cmp_u32);
	double msgs_s = el > 0 ? n_ok / el : 0;
	double mb_s = el > 0 ? (double)n_ok * (double)g_msg_bytes / el / 1e6 : 0;
	double hs_s = el > 0 ? n_handshakes / el : 0;
	double cpu = after.cpu_s - before.cpu_s;
	bool have_srv = o.npids > 0 || o.pids_cmd;
	double cpu_per_msg = n_ok > 0 ? cpu / (double)n_ok : 0;
	/* PSS splits shared pages between processes, which matters for Postfix */
	long mem_delta = before.pss_kb || after.pss_kb ? after.pss_kb - before.pss_kb
						      : after.rss_kb - before.rss_kb;
	double kb_per_idle = idle_reached > 0 ? (double)mem_delta / (double)idle_reached : 0;
	const char *modes[] = { "plain", "starttls", "tls" };

	if (o.csv) {
		printf("%s,%s,%s,%ld,%ld,%ld,%ld,%s,%s,%s,%ld,%ld,%ld,%ld,%.3f,%.1f,%.3f,%.1f,"
		       "%.3f,%.3f,%.3f,%.3f,%.6f,%ld,%ld,%ld,%ld,%.1f\n",
		       o.label, modes[o.mode], g_proto[0] ? g_proto : "-", o.connections, o.messages,
		       g_msg_bytes, o.rcpts, o.bdat ? "bdat" : "data", o.pipelining ? "pipe" : "nopipe",
		       g_cipher_name[0] ? g_cipher_name : "-", n_ok, n_fail, n_errors, n_handshakes, el,
		       msgs_s, mb_s, hs_s, pct(0.5), pct(0.99), g_lat_n ? g_lat_us[g_lat_n - 1] / 1000.0 : 0,
		       have_srv ? cpu : 0, have_srv ? cpu_per_msg : 0, have_srv ? after.hwm_kb : 0,
		       have_srv ? after.pss_kb : 0, have_srv ? mem_delta : 0,
		       idle_reached, have_srv ? kb_per_idle : 0);
	} else {
		printf("ktbench %s%s%s-> %s:%s mode=%s", o.label[0] ? "[" : "", o.label,
		       o.label[0] ? "] " : "", o.host, o.port, modes[o.mode]);
		if (o.idle)
			printf(" idle=%ld\n", o.idle);
		else
			printf(" conns=%ld msgs/conn=%ld size=%ld rcpts=%ld %s%s%s\n", o.connections,
			       o.messages, g_msg_bytes, o.rcpts, o.bdat ? "BDAT" : "DATA",
			       o.pipelining ? " pipelining" : "",
			       o.new_conn ? " new-conn-per-msg" : "");
		if (g_cipher_name[0])
			printf("  negotiated     %s %s\n", g_proto, g_cipher_name);
		printf("  elapsed        %.3f s\n", el);
		if (o.idle) {
			printf("  idle sessions  %ld of %ld reached EHLO and were held\n", idle_reached, o.idle);
		} else {
			printf("  messages       %ld ok, %ld failed\n", n_ok, n_fail);
			printf("  throughput     %.1f msg/s, %.2f MB/s\n", msgs_s, mb_s);
			printf("  latency        p50 %.3f ms, p99 %.3f ms, max %.3f ms (MAIL to final reply)\n",
			       pct(0.5), pct(0.99), g_lat_n ? g_lat_us[g_lat_n - 1] / 1000.0 : 0);
		}
		printf("  connections    %ld, TLS handshakes %ld (%.1f/s)\n", n_conn, n_handshakes, hs_s);
		printf("  errors         %ld\n", n_errors);
		for (int i = 0; i < n_first_errors; i++)
			printf("    %s\n", first_errors[i]);
		if (have_srv) {
			printf("  server         %d processes, CPU %.3f s", after.nproc, cpu);
			if (n_ok)
				printf(" (%.1f us/msg)", cpu_per_msg * 1e6);
			printf("\n  server memory  RSS %ld -> %ld kB, PSS %ld -> %ld kB, peak (sum VmHWM) %ld kB\n",
			       before.rss_kb, after.rss_kb, before.pss_kb, after.pss_kb, after.hwm_kb);
			if (o.idle && idle_reached)
				printf("  per session    %.1f kB (PSS delta / idle sessions)\n", kb_per_idle);
		}
	}
	free(g_lat_us);
	freeaddrinfo(g_addr);
	SSL_CTX_free(g_ctx);
	return n_errors || n_fail || (o.idle && idle_reached < o.idle) ? 1 : 0;
}
