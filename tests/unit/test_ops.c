/* Operations pieces: syslog facility names and maillog_file_prefixes (as
 * Postfix checks them), maillog_file line shape (the pid of a forked child,
 * time stamps across a second), the Message-ID header scan,
 * the metrics exposition (per-thread shards summed), the metrics address
 * syntax, and queue ids (short, upper-case hex, distinct). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/log.h"
#include "delivery/header_scan.h"
#include "metrics/metrics.h"
#include "queue/queue.h"

static void test_facility_names(void **state)
{
    assert_int_equal(kt_log_facility("mail"), LOG_MAIL);
    assert_int_equal(kt_log_facility("local7"), LOG_LOCAL7);
    assert_int_equal(kt_log_facility("daemon"), LOG_DAEMON);
    assert_int_equal(kt_log_facility("Mail"), -1);
    assert_int_equal(kt_log_facility("mial"), -1);
    assert_int_equal(kt_log_facility(""), -1);
}

static void test_maillog_prefixes(void **state)
{
    assert_true(kt_log_prefix_allowed("/var/log/maillog", "/var, /dev/stdout"));
    assert_true(kt_log_prefix_allowed("/dev/stdout", "/var, /dev/stdout"));
    assert_false(kt_log_prefix_allowed("/tmp/maillog", "/var, /dev/stdout"));
    assert_false(kt_log_prefix_allowed("/etc/passwd", ""));
    /* a plain string prefix, as Postfix compares it */
    assert_true(kt_log_prefix_allowed("/variable/x", "/var"));
    assert_true(kt_log_prefix_allowed("/srv/log/m", "/var,\t/srv/log"));
}

static void test_maillog_line_shape(void **state)
{
    char path[] = "/tmp/kt-test-maillog-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    struct kt_log_config lc = { .syslog_name = "ktrelay", .syslog_facility = LOG_MAIL, .maillog_file = path,
                                .hostname = "mx.example.test", .use_stderr = 0 };
    char err[256];
    assert_int_equal(kt_log_configure(&lc, err, sizeof(err)), 0);
    kt_log_set_service("smtpd");
    kt_info("ABCDEF0123456: client=unknown[192.0.2.1]");
    kt_log_as("virtual", KT_LOG_WARN, "careful");
    struct kt_log_config off = { .syslog_facility = LOG_MAIL, .use_stderr = 1 };
    assert_int_equal(kt_log_configure(&off, err, sizeof(err)), 0);
    FILE *f = fopen(path, "r");
    char l1[512], l2[512];
    assert_non_null(fgets(l1, sizeof(l1), f));
    assert_non_null(fgets(l2, sizeof(l2), f));
    fclose(f);
    unlink(path);
    char mon[4], rest[400];
    int day, h, m, s, pid;
    /* "Mmm dd hh:mm:ss host name/service[pid]: text" (Postfix's maillog_file) */
    assert_int_equal(sscanf(l1, "%3s %2d %2d:%2d:%2d mx ktrelay/smtpd[%d]: %399[^\n]", mon, &day, &h, &m, &s, &pid,
                            rest), 7);
    assert_string_equal(rest, "ABCDEF0123456: client=unknown[192.0.2.1]");
    assert_int_equal(pid, (int)getpid());
    assert_non_null(strstr(l2, " mx ktrelay/virtual["));
    assert_non_null(strstr(l2, "]: warning: careful\n"));
    kt_log_set_service(NULL);
}

static void log_to(const char *path)
{
    struct kt_log_config lc = { .syslog_name = "ktrelay", .syslog_facility = LOG_MAIL, .maillog_file = path,
                                .hostname = "mx.example.test", .use_stderr = 0 };
    char err[256];
    assert_int_equal(kt_log_configure(&lc, err, sizeof(err)), 0);
}

static void log_off(void)
{
    struct kt_log_config off = { .syslog_facility = LOG_MAIL, .use_stderr = 1 };
    char err[256];
    assert_int_equal(kt_log_configure(&off, err, sizeof(err)), 0);
}

/* The pid is read once per process: a child made by fork() after the parent logged says its own. */
static void test_maillog_pid_after_fork(void **state)
{
    char path[] = "/tmp/kt-test-maillog-XXXXXX";
    int fd = mkstemp(path), status = -1;
    assert_true(fd >= 0);
    close(fd);
    log_to(path);
    kt_info("parent line");
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) {
        kt_info("child line");
        _exit(0);
    }
    assert_int_equal(waitpid(child, &status, 0), child);
    assert_int_equal(status, 0);
    kt_info("parent again");
    log_off();
    FILE *f = fopen(path, "r");
    char l[3][512];
    for (int i = 0; i < 3; i++)
        assert_non_null(fgets(l[i], sizeof(l[i]), f));
    fclose(f);
    unlink(path);
    char want[128];
    snprintf(want, sizeof(want), "]: parent line\n");
    assert_non_null(strstr(l[0], want));
    snprintf(want, sizeof(want), "[%d]: parent line\n", (int)getpid());
    assert_non_null(strstr(l[0], want));
    snprintf(want, sizeof(want), "[%d]: child line\n", (int)child);
    assert_non_null(strstr(l[1], want));
    snprintf(want, sizeof(want), "[%d]: parent again\n", (int)getpid());
    assert_non_null(strstr(l[2], want));
}

/* Time stamps are kept for the second they show: a line of the next second shows the next second, with
 * the day zero-padded as Postfix's maillog_file writes it. */
static void test_maillog_stamp_per_second(void **state)
{
    char path[] = "/tmp/kt-test-maillog-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    log_to(path);
    time_t t0 = time(NULL);
    kt_info("first");
    while (time(NULL) == t0)
        usleep(1000);       /* the clock is the condition waited for */
    time_t t1 = time(NULL);
    kt_info("second");
    time_t t2 = time(NULL);
    log_off();
    FILE *f = fopen(path, "r");
    char l1[512], l2[512];
    assert_non_null(fgets(l1, sizeof(l1), f));
    assert_non_null(fgets(l2, sizeof(l2), f));
    fclose(f);
    unlink(path);
    char want[64];
    struct tm tm;
    localtime_r(&t0, &tm);
    strftime(want, sizeof(want), "%b %d %H:%M:%S mx ", &tm);
    assert_memory_equal(l1, want, strlen(want));
    /* the second line was written at t1 or, at most, t2 */
    localtime_r(&t1, &tm);
    strftime(want, sizeof(want), "%b %d %H:%M:%S mx ", &tm);
    if (memcmp(l2, want, strlen(want)) != 0) {
        localtime_r(&t2, &tm);
        strftime(want, sizeof(want), "%b %d %H:%M:%S mx ", &tm);
        assert_memory_equal(l2, want, strlen(want));
    }
    assert_true(strstr(l2, "]: second\n") != NULL);
}

static void test_header_scan(void **state)
{
    struct kt_header_scan h;
    static const char msg[] = "Subject: x\r\nMessage-Id:\r\n  <abc@example.org> \r\nTo: y\r\n\r\n"
                              "Message-ID: <body@not.header>\r\n";
    kt_header_scan_reset(&h);
    /* fed in pieces, as the body streams in */
    for (size_t i = 0; i < sizeof(msg) - 1; i += 7)
        kt_header_scan_feed(&h, msg + i, sizeof(msg) - 1 - i < 7 ? sizeof(msg) - 1 - i : 7);
    assert_true(h.done);
    assert_string_equal(h.message_id, "<abc@example.org>");
    kt_header_scan_reset(&h);
    kt_header_scan_feed(&h, "Subject: none\n\nMessage-ID: <late@x>\n", 36);
    assert_string_equal(h.message_id, "");
}

static void *record(void *arg)
{
    for (int i = 0; i < 1000; i++)
        kt_metric_inc(KT_M_DELIVERY_SENT);
    kt_metric_observe(KT_H_DELIVERY, 0.002);
    kt_metric_tls_handshake(0x0304, 1, 0.004, 1, 0);
    return NULL;
}

static long long sample(const char *text, const char *name)
{
    const char *p = strstr(text, name);
    if (!p)
        return -1;
    return atoll(p + strlen(name));
}

static void test_metrics_sum_threads(void **state)
{
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, record, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    kt_metric_add(KT_M_CONN_SMTPD, 3);
    kt_metric_add(KT_M_CONN_SMTPD, -1);
    size_t len;
    char *text = kt_metrics_render(&len);
    assert_int_equal(strlen(text), len);
    assert_int_equal(sample(text, "ktrelay_deliveries_total{status=\"sent\"} "), 4000);
    assert_int_equal(sample(text, "ktrelay_connections{service=\"smtpd\"} "), 2);
    assert_int_equal(sample(text, "ktrelay_tls_handshakes_total{version=\"TLSv1.3\",resumed=\"yes\"} "), 4);
    assert_int_equal(sample(text, "ktrelay_ktls_sessions_total{direction=\"tx\"} "), 4);
    assert_int_equal(sample(text, "ktrelay_tls_handshake_seconds_bucket{le=\"0.0025\"} "), 0);
    assert_int_equal(sample(text, "ktrelay_tls_handshake_seconds_bucket{le=\"0.005\"} "), 4);
    assert_int_equal(sample(text, "ktrelay_tls_handshake_seconds_bucket{le=\"+Inf\"} "), 4);
    assert_int_equal(sample(text, "ktrelay_delivery_seconds_count "), 4);
    assert_non_null(strstr(text, "# TYPE ktrelay_delivery_seconds histogram\n"));
    kt_free(text);
    kt_metrics_shutdown();
}

static void test_metrics_address(void **state)
{
    char host[64], err[128];
    unsigned port;
    assert_int_equal(kt_metrics_parse_address("127.0.0.1:9100", host, sizeof(host), &port, err, sizeof(err)), 0);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 9100);
    assert_int_equal(kt_metrics_parse_address("[::1]:9100", host, sizeof(host), &port, err, sizeof(err)), 0);
    assert_string_equal(host, "::1");
    assert_int_equal(kt_metrics_parse_address(":9100", host, sizeof(host), &port, err, sizeof(err)), 0);
    assert_string_equal(host, "");
    assert_true(kt_metrics_parse_address("127.0.0.1", host, sizeof(host), &port, err, sizeof(err)) < 0);
    assert_true(kt_metrics_parse_address("h:0", host, sizeof(host), &port, err, sizeof(err)) < 0);
    assert_true(kt_metrics_parse_address("h:70000", host, sizeof(host), &port, err, sizeof(err)) < 0);
    assert_true(kt_metrics_parse_address("[::1]9100", host, sizeof(host), &port, err, sizeof(err)) < 0);
}

static void test_queue_ids(void **state)
{
    char a[KT_QUEUE_ID_MAX], b[KT_QUEUE_ID_MAX];
    kt_queue_new_id(a, sizeof(a));
    kt_queue_new_id(b, sizeof(b));
    assert_int_equal(strlen(a), 13);
    assert_int_equal(strspn(a, "0123456789ABCDEF"), 13);
    assert_string_not_equal(a, b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_facility_names),
        cmocka_unit_test(test_maillog_prefixes),
        cmocka_unit_test(test_maillog_line_shape),
        cmocka_unit_test(test_maillog_pid_after_fork),
        cmocka_unit_test(test_maillog_stamp_per_second),
        cmocka_unit_test(test_header_scan),
        cmocka_unit_test(test_metrics_sum_threads),
        cmocka_unit_test(test_metrics_address),
        cmocka_unit_test(test_queue_ids),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
