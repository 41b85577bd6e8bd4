/* Unit tests for SASL: base64, PLAIN messages, security options, the crypt(3)
 * password file, the Dovecot auth protocol (against a scripted server on a
 * unix socket), the pool's completion through IORING_OP_MSG_RING, and the
 * per-address failure counter. */
#include <crypt.h>
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/alloc.h"
#include "smtpd/sasl.h"

static char tmpdir[] = "/tmp/kt_sasl_XXXXXX";

static void test_base64(void **state)
{
    (void)state;
    unsigned char in[64], back[64];
    char enc[100];
    for (size_t len = 0; len < sizeof(in); len++) {
        for (size_t i = 0; i < len; i++)
            in[i] = (unsigned char)(rand() & 0xff);
        kt_base64_encode(in, len, enc);
        assert_int_equal(strlen(enc), 4 * ((len + 2) / 3));
        assert_int_equal(kt_base64_decode(enc, strlen(enc), back, sizeof(back)), (ssize_t)len);
        assert_memory_equal(in, back, len);
    }
    kt_base64_encode("\0alice\0s3cret", 13, enc);
    assert_string_equal(enc, "AGFsaWNlAHMzY3JldA==");
    static const char *const bad[] = { "abc", "ab=c", "a===", "YQ=x", "YR==", "YWJ=", "YW Jj", "====", "Y*==",
                                       "YQ==YQ==" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(kt_base64_decode(bad[i], strlen(bad[i]), back, sizeof(back)), -EINVAL);
    /* output bound */
    assert_int_equal(kt_base64_decode("YWJj", 4, back, 2), -EINVAL);
}

static void test_plain_split(void **state)
{
    (void)state;
    char m[64];
    const char *z, *c, *p;
    memcpy(m, "\0alice\0pw", 9);
    assert_int_equal(kt_sasl_plain_split(m, 9, &z, &c, &p), 0);
    assert_string_equal(z, "");
    assert_string_equal(c, "alice");
    assert_string_equal(p, "pw");
    memcpy(m, "admin\0alice\0pw", 14);
    assert_int_equal(kt_sasl_plain_split(m, 14, &z, &c, &p), 0);
    assert_string_equal(z, "admin");
    static const struct { const char *msg; size_t len; } bad[] = {
        { "alice\0pw", 8 }, { "\0\0pw", 4 }, { "\0alice\0", 7 }, { "\0a\0b\0c", 6 }, { "", 0 },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        memcpy(m, bad[i].msg, bad[i].len);
        assert_int_equal(kt_sasl_plain_split(m, bad[i].len, &z, &c, &p), -EINVAL);
    }
}

static void test_security_options(void **state)
{
    (void)state;
    unsigned m;
    char err[128];
    assert_int_equal(kt_sasl_security_mechs("noanonymous", &m, err, sizeof(err)), 0);
    assert_int_equal(m, KT_MECH_ALL);
    assert_int_equal(kt_sasl_security_mechs("", &m, err, sizeof(err)), 0);
    assert_int_equal(m, KT_MECH_ALL);
    assert_int_equal(kt_sasl_security_mechs("noanonymous, noplaintext", &m, err, sizeof(err)), 0);
    assert_int_equal(m, 0);
    assert_int_equal(kt_sasl_security_mechs("nodictionary", &m, err, sizeof(err)), 0);
    assert_int_equal(m, 0);
    assert_int_equal(kt_sasl_security_mechs("noanonymous nosuchthing", &m, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "nosuchthing"));
    assert_int_equal(kt_sasl_mech_from_name("plain", 5), KT_MECH_PLAIN);
    assert_int_equal(kt_sasl_mech_from_name("LOGIN", 5), KT_MECH_LOGIN);
    assert_int_equal(kt_sasl_mech_from_name("CRAM-MD5", 8), 0u);
    assert_int_equal(kt_sasl_mech_from_name("PLAINX", 6), 0u);
}

static char *hash_of(const char *pw, const char *prefix)
{
    char *setting = crypt_gensalt_ra(prefix, 0, NULL, 0);
    assert_non_null(setting);
    struct crypt_data cd;
    memset(&cd, 0, sizeof(cd));
    char *h = kt_strdup(crypt_r(pw, setting, &cd));
    free(setting);
    assert_true(h[0] == '$');
    return h;
}

static char *passwd_file(void)
{
    char *sha = hash_of("s3cret", "$6$"), *yes = hash_of("hunter2", "$y$");
    char *path = kt_asprintf("%s/passwd", tmpdir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "# comment\n\nalice:%s\nbob:{SHA512-CRYPT}%s:1000:1000::/home/bob\ncarol:plaintext\nbroken line\n"
               "dave:%s\n", sha, sha, yes);
    fclose(f);
    kt_free(sha);
    kt_free(yes);
    return path;
}

static int check(const struct kt_sasl_server *srv, const char *user, const char *pass, struct kt_auth_req *req)
{
    memset(req, 0, sizeof(*req));
    req->srv = srv;
    snprintf(req->user, sizeof(req->user), "%s", user);
    snprintf(req->pass, sizeof(req->pass), "%s", pass);
    snprintf(req->client_addr, sizeof(req->client_addr), "192.0.2.1");
    int rc = kt_sasl_check(req);
    for (size_t i = 0; i < sizeof(req->pass); i++)
        assert_int_equal(req->pass[i], 0);   /* wiped */
    return rc;
}

static void test_password_file(void **state)
{
    (void)state;
    char *path = passwd_file();
    struct kt_sasl_server *srv;
    struct kt_auth_req req;
    char err[256];
    assert_int_equal(kt_sasl_server_open("cyrus", path, &srv, err, sizeof(err)), 0);
    assert_int_equal(check(srv, "alice", "s3cret", &req), KT_AUTH_OK);
    assert_string_equal(req.canon_user, "alice");
    assert_int_equal(check(srv, "alice", "s3cret ", &req), KT_AUTH_FAIL);
    assert_string_equal(req.reason, "authentication failure");
    assert_int_equal(check(srv, "Alice", "s3cret", &req), KT_AUTH_FAIL);
    assert_int_equal(check(srv, "bob", "s3cret", &req), KT_AUTH_OK);
    assert_int_equal(check(srv, "dave", "hunter2", &req), KT_AUTH_OK);
    assert_int_equal(check(srv, "dave", "hunter3", &req), KT_AUTH_FAIL);
    assert_int_equal(check(srv, "carol", "plaintext", &req), KT_AUTH_FAIL);
    assert_int_equal(check(srv, "nobody", "s3cret", &req), KT_AUTH_FAIL);
    assert_int_equal(check(srv, "", "", &req), KT_AUTH_FAIL);
    kt_sasl_server_free(srv);
    kt_sasl_server_free(NULL);

    assert_int_equal(kt_sasl_server_open("ktrelay", "/nonexistent/passwd", &srv, err, sizeof(err)), -ENOENT);
    assert_int_equal(kt_sasl_server_open("cyrus", "", &srv, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "ktrelay_sasl_password_file"));
    assert_int_equal(kt_sasl_server_open("sql", path, &srv, err, sizeof(err)), -EINVAL);
    unlink(path);
    kt_free(path);
}

/* ---- a scripted Dovecot auth server ---- */

struct fake_dovecot {
    int lfd;
    char sock[108];
    pthread_t thread;
    int conns;
    char last_auth[512];
};

static void *fake_dovecot_main(void *arg)
{
    struct fake_dovecot *d = arg;
    for (;;) {
        int fd = accept(d->lfd, NULL, NULL);
        if (fd < 0)
            return NULL;
        d->conns++;
        const char *hello = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t1\nCUID\t7\n"
                            "COOKIE\t0123456789abcdef\nDONE\n";
        if (write(fd, hello, strlen(hello)) < 0) {
            close(fd);
            continue;
        }
        char buf[2048];
        size_t len = 0;
        char *auth = NULL;
        while (!auth && len < sizeof(buf) - 1) {
            ssize_t r = read(fd, buf + len, sizeof(buf) - 1 - len);
            if (r <= 0)
                break;
            len += (size_t)r;
            buf[len] = '\0';
            char *a = strstr(buf, "AUTH\t");
            if (a && strchr(a, '\n'))
                auth = a;
        }
        if (!auth || !strstr(buf, "VERSION\t1\t") || !strstr(buf, "CPID\t")) {
            close(fd);
            continue;
        }
        *strchr(auth, '\n') = '\0';
        snprintf(d->last_auth, sizeof(d->last_auth), "%s", auth);
        const char *resp = strstr(auth, "\tresp=");
        const char *out = "FAIL\t1\tuser=?\n";
        if (resp && strcmp(resp + 6, "AGFsaWNlAHMzY3JldA==") == 0)          /* alice / s3cret */
            out = "OK\t1\tuser=alice@example.com\n";
        else if (resp && strcmp(resp + 6, "AGJvYgB0ZW1w") == 0)             /* bob / temp */
            out = "FAIL\t1\tuser=bob\ttemp\treason=backend down\n";
        if (write(fd, out, strlen(out)) < 0) { /* the client went away */ }
        close(fd);
    }
}

static void fake_dovecot_start(struct fake_dovecot *d)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    snprintf(d->sock, sizeof(d->sock), "%s/auth", tmpdir);
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", d->sock);
    d->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(d->lfd >= 0);
    assert_int_equal(bind(d->lfd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    assert_int_equal(listen(d->lfd, 8), 0);
    assert_int_equal(pthread_create(&d->thread, NULL, fake_dovecot_main, d), 0);
}

static void fake_dovecot_stop(struct fake_dovecot *d)
{
    shutdown(d->lfd, SHUT_RDWR);
    pthread_join(d->thread, NULL);
    close(d->lfd);
    unlink(d->sock);
}

static void test_dovecot_protocol(void **state)
{
    (void)state;
    struct fake_dovecot d = { 0 };
    struct kt_sasl_server *srv;
    struct kt_auth_req req;
    char err[256];
    fake_dovecot_start(&d);
    assert_int_equal(kt_sasl_server_open("dovecot", d.sock, &srv, err, sizeof(err)), 0);
    assert_int_equal(check(srv, "alice", "s3cret", &req), KT_AUTH_OK);
    assert_string_equal(req.canon_user, "alice@example.com");
    assert_non_null(strstr(d.last_auth, "AUTH\t1\tPLAIN\tservice=smtp\t"));
    assert_non_null(strstr(d.last_auth, "\trip=192.0.2.1"));
    assert_null(strstr(d.last_auth, "\tsecured"));
    assert_int_equal(check(srv, "alice", "wrong", &req), KT_AUTH_FAIL);
    assert_int_equal(check(srv, "bob", "temp", &req), KT_AUTH_TEMP);
    assert_string_equal(req.reason, "backend down");
    assert_int_equal(d.conns, 3);
    kt_sasl_server_free(srv);
    fake_dovecot_stop(&d);

    /* nobody listening: a temporary failure, not a wrong password */
    assert_int_equal(kt_sasl_server_open("dovecot", d.sock, &srv, err, sizeof(err)), 0);
    assert_int_equal(check(srv, "alice", "s3cret", &req), KT_AUTH_TEMP);
    kt_sasl_server_free(srv);
}

/* The pool answers on the submitter's ring, with the request's kt_op as user_data. */
static void test_pool_msg_ring(void **state)
{
    (void)state;
    char *path = passwd_file();
    struct kt_sasl_server *srv;
    char err[256];
    struct io_uring ring;
    assert_int_equal(kt_sasl_server_open("cyrus", path, &srv, err, sizeof(err)), 0);
    assert_int_equal(io_uring_queue_init(8, &ring, 0), 0);

    struct kt_auth_req *reqs = kt_calloc(6, sizeof(*reqs));
    for (int i = 0; i < 6; i++) {
        reqs[i].srv = srv;
        reqs[i].ring_fd = ring.ring_fd;
        snprintf(reqs[i].user, sizeof(reqs[i].user), "%s", i % 2 ? "alice" : "nobody");
        snprintf(reqs[i].pass, sizeof(reqs[i].pass), "s3cret");
        kt_auth_submit(&reqs[i]);
    }
    int seen[6] = { 0 };
    for (int n = 0; n < 6; n++) {
        struct io_uring_cqe *cqe;
        assert_int_equal(io_uring_wait_cqe(&ring, &cqe), 0);
        struct kt_op *op = io_uring_cqe_get_data(cqe);
        long i = (struct kt_auth_req *)op - reqs;
        assert_true(i >= 0 && i < 6);
        assert_int_equal(cqe->res, i % 2 ? KT_AUTH_OK : KT_AUTH_FAIL);
        seen[i]++;
        io_uring_cqe_seen(&ring, cqe);
    }
    for (int i = 0; i < 6; i++)
        assert_int_equal(seen[i], 1);
    kt_free(reqs);
    io_uring_queue_exit(&ring);
    kt_sasl_server_free(srv);
    unlink(path);
    kt_free(path);
}

static void test_failure_counter(void **state)
{
    (void)state;
    assert_int_equal(kt_auth_fail_record("198.51.100.1"), 1);
    assert_int_equal(kt_auth_fail_record("198.51.100.1"), 2);
    assert_int_equal(kt_auth_fail_record("198.51.100.2"), 1);
    assert_int_equal(kt_auth_fail_record("198.51.100.1"), 3);
    kt_auth_fail_forget("198.51.100.1");
    assert_int_equal(kt_auth_fail_record("198.51.100.1"), 1);
    assert_int_equal(kt_auth_fail_record("198.51.100.2"), 2);
    /* more addresses than slots: still counts, never overflows */
    char a[32];
    for (int i = 0; i < 1000; i++) {
        snprintf(a, sizeof(a), "10.0.%d.%d", i / 256, i % 256);
        assert_int_equal(kt_auth_fail_record(a), 1);
    }
}

static int setup(void **state)
{
    (void)state;
    assert_non_null(mkdtemp(tmpdir));
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    rmdir(tmpdir);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base64),
        cmocka_unit_test(test_plain_split),
        cmocka_unit_test(test_security_options),
        cmocka_unit_test(test_password_file),
        cmocka_unit_test(test_dovecot_protocol),
        cmocka_unit_test(test_pool_msg_ring),
        cmocka_unit_test(test_failure_counter),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
