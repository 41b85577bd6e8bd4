/* ktrelay command line: run, check-config, config [-n], sendmail, queue, version. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kt_build.h"
#include "core/alloc.h"
#include "conf/config.h"
#include "core/log.h"
#include "queue/queue.h"
#include "smtpd/server.h"
#include "conf/settings.h"
#include "tls/tls.h"

#define DEFAULT_DIR "ktrelay-data"

#if KT_HAVE_JEMALLOC
/* jemalloc reads this at start-up. Handshake bursts leave dirty pages behind;
 * a background thread returns them after a second even when the sessions
 * that follow sit idle and never call the allocator. */
const char *malloc_conf = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0";
#endif

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ktrelay run [-c DIR]            run in the foreground, log to stderr\n"
            "       ktrelay check-config -c DIR     validate main.cf and master.cf\n"
            "       ktrelay config -c DIR [-n]      print parameters (-n: only those set, like postconf -n)\n"
            "       ktrelay sendmail -c DIR [-f sender] [-i] rcpt...   queue a message read from stdin\n"
            "       ktrelay queue -c DIR list | flush | delete ID|ALL   show, retry now, remove queued mail\n"
            "       ktrelay version\n"
            "Without -c, run uses the embedded default configuration in ./" DEFAULT_DIR "/ (created on first\n"
            "start: self-signed certificate, STARTTLS on 127.0.0.1:2525, implicit TLS on 127.0.0.1:4465,\n"
            "mail for any address @localhost into ./" DEFAULT_DIR "/mail/).\n");
}

static int write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    fputs(text, f);
    return fclose(f) == 0 ? 0 : -errno;
}

/* The embedded default: a complete, safe configuration written out so that it
 * can be read and edited like any other. */
static int make_default_config(const char *dir)
{
    char path[4096], err[512];
    char *cwd = getcwd(NULL, 0);
    if (!cwd)
        return -errno;
    char *abs = dir[0] == '/' ? kt_strdup(dir) : kt_asprintf("%s/%s", cwd, dir);
    free(cwd);
    snprintf(path, sizeof(path), "%s/main.cf", abs);
    if (access(path, F_OK) == 0) {
        kt_free(abs);
        return 0;
    }
    if (mkdir(abs, 0755) < 0 && errno != EEXIST) {
        int e = -errno;
        kt_free(abs);
        return e;
    }
    kt_info("creating the default configuration in %s", abs);
    char *main_cf = kt_asprintf(
        "# ktrelay embedded default configuration (Postfix main.cf syntax).\n"
        "data_directory = %s\n"
        "queue_directory = %s/queue\n"
        "myhostname = localhost\n"
        "mydestination =\n"
        "inet_interfaces = loopback-only\n"
        "inet_protocols = ipv4\n"
        "virtual_mailbox_domains = localhost\n"
        "virtual_mailbox_base = $data_directory/mail\n"
        "virtual_mailbox_maps = texthash:$data_directory/vmailbox\n"
        "alias_maps =\n"
        "smtpd_tls_security_level = may\n"
        "smtpd_tls_eccert_file = $data_directory/cert.pem\n"
        "smtpd_tls_eckey_file = $data_directory/key.pem\n"
        "smtpd_tls_protocols = >=TLSv1.2\n"
        "smtpd_tls_mandatory_protocols = >=TLSv1.2\n"
        "smtpd_tls_ciphers = high\n"
        "smtpd_tls_mandatory_ciphers = high\n"
        "# forward-secret AEAD suites only (TLS 1.2); TLS 1.3 suites are all AEAD\n"
        "tls_high_cipherlist = ECDHE+AESGCM:ECDHE+CHACHA20\n"
        "smtpd_tls_loglevel = 1\n"
        "smtpd_tls_received_header = yes\n"
        "# AUTH (off here): users and crypt(3) hashes in the built-in password file. To offer it, add\n"
        "# to a service in master.cf: -o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=yes\n"
        "ktrelay_sasl_password_file = $data_directory/sasl-passwd\n",
        abs, abs);
    int rc = write_file(path, main_cf);
    kt_free(main_cf);
    snprintf(path, sizeof(path), "%s/master.cf", abs);
    if (rc == 0)
        rc = write_file(path,
                        "# service type  private unpriv  chroot  wakeup  maxproc command + args\n"
                        "127.0.0.1:2525 inet n - n - - smtpd\n"
                        "127.0.0.1:4465 inet n - n - - smtpd\n"
                        "  -o smtpd_tls_wrappermode=yes\n");
    snprintf(path, sizeof(path), "%s/vmailbox", abs);
    if (rc == 0)
        rc = write_file(path,
                        "# address            Maildir under virtual_mailbox_base (a trailing / means Maildir)\n"
                        "postmaster@localhost localhost/postmaster/\n"
                        "@localhost           localhost/catchall/\n");
    snprintf(path, sizeof(path), "%s/sasl-passwd", abs);
    if (rc == 0)
        rc = write_file(path,
                        "# SASL users for AUTH PLAIN/LOGIN: \"user:hash\" lines, the hash from crypt(3), e.g.\n"
                        "#   printf 'alice:%s\\n' \"$(mkpasswd -m yescrypt)\" >> sasl-passwd\n"
                        "#   printf 'alice:%s\\n' \"$(openssl passwd -6)\" >> sasl-passwd\n"
                        "# Read at start and on SIGHUP.\n");
    if (rc == 0) {
        chmod(path, 0600);
        char cert[4096], key[4096];
        snprintf(cert, sizeof(cert), "%s/cert.pem", abs);
        snprintf(key, sizeof(key), "%s/key.pem", abs);
        if (kt_tls_make_self_signed(cert, key, "localhost", err, sizeof(err)) < 0) {
            kt_err("cannot create the self-signed certificate: %s", err);
            rc = -EIO;
        }
    }
    kt_free(abs);
    return rc;
}

static int load_runtime(const char *dir, struct kt_runtime **rt)
{
    struct kt_config *cfg;
    if (kt_config_load(dir, &cfg) < 0)
        return -EINVAL;
    if (kt_runtime_new(cfg, rt) < 0) {
        kt_config_free(cfg);
        return -EINVAL;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    int nondefault = 0;

    kt_log_set_program("ktrelay/smtpd");
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    int opt;
    if (!strcmp(cmd, "sendmail")) {
        kt_log_set_program("ktrelay/sendmail");
        return kt_queue_cli_sendmail(argc - 1, argv + 1);
    }
    if (!strcmp(cmd, "queue")) {
        kt_log_set_program("ktrelay/queue");
        return kt_queue_cli_queue(argc - 1, argv + 1);
    }
    optind = 2;
    while ((opt = getopt(argc, argv, "c:nv")) != -1) {
        switch (opt) {
        case 'c': dir = optarg; break;
        case 'n': nondefault = 1; break;
        case 'v': kt_log_set_debug(1); break;
        default: usage(stderr); return 2;
        }
    }
    if (!strcmp(cmd, "version")) {
        printf("ktrelay %s\n", KT_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "run")) {
        struct kt_runtime *rt;
        if (!dir) {
            if (make_default_config(DEFAULT_DIR) < 0) {
                kt_err("cannot create the default configuration in ./%s", DEFAULT_DIR);
                return 1;
            }
            dir = DEFAULT_DIR;
        }
        if (load_runtime(dir, &rt) < 0) {
            kt_err("fatal: configuration errors in %s", dir);
            return 1;
        }
        return kt_server_run(rt, dir);
    }
    if (!dir) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(cmd, "check-config")) {
        struct kt_runtime *rt;
        if (load_runtime(dir, &rt) < 0) {
            fprintf(stderr, "ktrelay: %s: configuration has errors\n", dir);
            return 1;
        }
        kt_runtime_unref(rt);
        printf("ktrelay: %s: configuration OK\n", dir);
        return 0;
    }
    if (!strcmp(cmd, "config")) {
        struct kt_config *cfg;
        if (kt_config_load(dir, &cfg) < 0)
            return 1;
        kt_config_print(cfg, stdout, nondefault);
        kt_config_free(cfg);
        return 0;
    }
    usage(stderr);
    return 2;
}
