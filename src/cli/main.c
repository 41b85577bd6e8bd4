/* ktrelay's command line: run, check-config, config [-n] [NAME...], sendmail,
 * queue, version, help; and, by the name it is invoked as, sendmail(1),
 * mailq(1) and newaliases(1). Options may stand anywhere after the command.
 * The configuration directory rule and the sysexits(3) exit codes are in
 * cli/cli.h; every code a command can return is listed in the README. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kt_build.h"
#include "cli/cli.h"
#include "core/alloc.h"
#include "conf/config.h"
#include "core/lockfile.h"
#include "core/log.h"
#include "queue/queue.h"
#include "master/master.h"
#include "smtpd/server.h"
#include "conf/settings.h"
#include "tls/tls.h"

#define DEFAULT_DIR KT_CLI_DEFAULT_DIR

#if KT_HAVE_JEMALLOC
/* jemalloc reads this at start-up. Handshake bursts leave dirty pages behind;
 * a background thread returns them after a second even when the sessions
 * that follow sit idle and never call the allocator. */
const char *malloc_conf = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0";
#endif

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ktrelay COMMAND [-c DIR] [options]\n"
            "  run [-v]                         run in the foreground, log to stderr (and syslog/maillog_file)\n"
            "  check-config                     load and validate the configuration, tables, certificates\n"
            "  config [-n] [NAME...]            print parameters like postconf (-n: only those main.cf sets)\n"
            "  sendmail [-t] [-i] [-f SENDER] [-F NAME] [-bp|-bs|-bi] [-q] [RCPT...]   submit stdin\n"
            "  queue list | flush | show ID | delete|hold|release|requeue ID|ALL   like mailq, postcat, postsuper\n"
            "  tlsrpt flush                     write the TLS reports (RFC 8460) of the counts so far now\n"
            "  version, --version               print the version\n"
            "  help, --help                     this text\n"
            "Options may stand anywhere after COMMAND. The configuration directory (main.cf, master.cf) is\n"
            "-c DIR, else $KTRELAY_CONFIG, else " KT_CLI_SYSTEM_DIR " when it has main.cf, else ./" DEFAULT_DIR "\n"
            "(the embedded default, which run writes on first start: self-signed certificate, STARTTLS on\n"
            "127.0.0.1:2525, implicit TLS on 127.0.0.1:4465, mail for any address @localhost into\n"
            "./" DEFAULT_DIR "/mail/). Installed as sendmail, mailq or newaliases, ktrelay acts as those.\n"
            "Exit codes: sysexits(3): 0 ok, 64 usage, 66 no such queue id, 69 cannot start, 71 system error,\n"
            "73 cannot create files, 75 try again later, 77 permission denied, 78 configuration error.\n");
}

/* Writes text into DIR/NAME, created or truncated. Returns 0 or -errno. */
static int write_file(const char *dir, const char *name, const char *text)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    fputs(text, f);
    return fclose(f) == 0 ? 0 : -errno;
}

/* The embedded default's files after main.cf (which names its directory), written in this order. */
static const struct {
    const char *name, *text;
} default_files[] = {
    { "master.cf", "# service type  private unpriv  chroot  wakeup  maxproc command + args\n"
                   "127.0.0.1:2525 inet n - n - - smtpd\n"
                   "127.0.0.1:4465 inet n - n - - smtpd\n"
                   "  -o smtpd_tls_wrappermode=yes\n" },
    { "vmailbox", "# address            Maildir under virtual_mailbox_base (a trailing / means Maildir)\n"
                  "postmaster@localhost localhost/postmaster/\n"
                  "@localhost           localhost/catchall/\n" },
    { "sasl-passwd", "# SASL users for AUTH PLAIN/LOGIN: \"user:hash\" lines, the hash from crypt(3), e.g.\n"
                     "#   printf 'alice:%s\\n' \"$(mkpasswd -m yescrypt)\" >> sasl-passwd\n"
                     "#   printf 'alice:%s\\n' \"$(openssl passwd -6)\" >> sasl-passwd\n"
                     "# Read at start and on SIGHUP.\n" },
};

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
    int rc = write_file(abs, "main.cf", main_cf);
    kt_free(main_cf);
    for (size_t i = 0; rc == 0 && i < sizeof(default_files) / sizeof(default_files[0]); i++)
        rc = write_file(abs, default_files[i].name, default_files[i].text);
    if (rc == 0) {
        snprintf(path, sizeof(path), "%s/sasl-passwd", abs);
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
    if (kt_listen_check(*rt) > 0) {
        kt_runtime_unref(*rt);
        *rt = NULL;
        return -EINVAL;
    }
    return 0;
}

/* ktrelay as sendmail(1), mailq(1) or newaliases(1) when invoked by that name. */
static int dispatch_by_name(const char *name, int argc, char **argv, int *rc)
{
    if (!strcmp(name, "sendmail")) {
        kt_log_set_program("ktrelay/sendmail");
        *rc = kt_queue_cli_sendmail(argc, argv);
        return 1;
    }
    if (!strcmp(name, "mailq")) {
        kt_log_set_program("ktrelay/postqueue");
        /* mailq [-c DIR] is `queue list` */
        char **copy = kt_calloc((size_t)argc + 2, sizeof(*copy));
        int n = 0;
        for (int i = 0; i < argc; i++)
            copy[n++] = argv[i];
        copy[n++] = (char *)"list";
        copy[n] = NULL;
        *rc = kt_queue_cli_queue(n, copy);
        kt_free(copy);
        return 1;
    }
    if (!strcmp(name, "newaliases")) {
        /* Postfix's newaliases rebuilds the .db files; ktrelay reads the text
         * alias files themselves, so there is nothing to build. */
        printf("newaliases: ktrelay reads alias_maps from their text files; nothing to rebuild. A running\n"
               "server loads changes on reload (systemctl reload ktrelay, or SIGHUP).\n");
        *rc = EX_OK;
        return 1;
    }
    return 0;
}

/* systemd connects stderr to the journal and says so in $JOURNAL_STREAM
 * ("device:inode"); lines sent to syslog reach the journal too, so stderr
 * would store each line twice. */
static int stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (!js || sscanf(js, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

/* `run`: syslog (or maillog_file) as configured, stderr as well in the foreground. */
static int start_logging(const struct kt_runtime *rt)
{
    char err[512];
    int syslog_on = !rt->maillog_file[0];
    struct kt_log_config lc = {
        .syslog_name = rt->syslog_name,
        .syslog_facility = rt->syslog_facility,
        .use_syslog = syslog_on,
        .maillog_file = rt->maillog_file,
        .hostname = rt->myhostname,
        .use_stderr = !(syslog_on && stderr_is_journal()),
    };
    if (kt_log_configure(&lc, err, sizeof(err)) < 0) {
        kt_err("fatal: %s; create it writable for ktrelay, or change maillog_file", err);
        return -1;
    }
    return 0;
}

static int start_error_code(int rc)
{
    return rc == 0 ? EX_OK : rc > 0 ? rc : EX_UNAVAILABLE;
}

/* One instance per data_directory, as Postfix's master.lock: a second `run`
 * would share the ports (SO_REUSEPORT) and run a second queue manager on the
 * same queue. Returns the locked descriptor, which holds the lock until this
 * process exits (the master's children close their copies), or -errno. */
static int instance_lock(const struct kt_runtime *rt)
{
    const char *dir = rt->data_directory;
    char *path;
    pid_t holder;
    int fd, rc;

    if (!dir[0] || dir[0] != '/') {
        kt_err("data_directory must be an absolute path (it holds the instance lock), not \"%s\"", dir);
        return -EINVAL;
    }
    if (mkdir(dir, 0700) == 0)
        kt_info("created data_directory %s", dir);
    else if (errno != EEXIST) {
        rc = -errno;
        kt_err("fatal: cannot create data_directory %s: %s; create it, or set data_directory in main.cf", dir,
               strerror(-rc));
        return rc;
    }
    path = kt_asprintf("%s/master.lock", dir);
    rc = kt_lockfile_acquire(path, &fd, &holder);
    if (rc == -EWOULDBLOCK) {
        if (holder)
            kt_err("fatal: ktrelay is already running as PID %ld with data_directory %s (%s is locked); "
                   "stop it first, or give this instance its own data_directory", (long)holder, dir, path);
        else
            kt_err("fatal: ktrelay is already running with data_directory %s (%s is locked); stop it first, "
                   "or give this instance its own data_directory", dir, path);
    } else if (rc < 0) {
        kt_err("fatal: cannot lock %s: %s", path, strerror(-rc));
    }
    kt_free(path);
    return rc < 0 ? rc : fd;
}

int main(int argc, char **argv)
{
    const char *given = NULL;
    int nondefault = 0, rc;

    kt_log_set_program("ktrelay/smtpd");
    const char *base = strrchr(argv[0], '/');
    base = base ? base + 1 : argv[0];
    if (dispatch_by_name(base, argc, argv, &rc))
        return rc;
    if (argc < 2) {
        usage(stderr);
        return EX_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version") || !strcmp(cmd, "-V")) {
        printf("ktrelay %s\n", KT_VERSION);
        return EX_OK;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return EX_OK;
    }
    if (!strcmp(cmd, "sendmail")) {
        kt_log_set_program("ktrelay/sendmail");
        return kt_queue_cli_sendmail(argc - 1, argv + 1);
    }
    if (!strcmp(cmd, "queue")) {
        kt_log_set_program("ktrelay/postqueue");
        return kt_queue_cli_queue(argc - 1, argv + 1);
    }
    if (!strcmp(cmd, "tlsrpt")) {
        kt_log_set_program("ktrelay/postqueue");
        return kt_queue_cli_tlsrpt(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "run") && strcmp(cmd, "check-config") && strcmp(cmd, "config")) {
        fprintf(stderr, "ktrelay: unknown command '%s'\n", cmd);
        usage(stderr);
        return EX_USAGE;
    }
    /* options anywhere after the command (GNU getopt permutes): config NAME -c DIR works */
    static const struct option longopts[] = {
        { "config-dir", required_argument, NULL, 'c' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int opt, sub_argc = argc - 1;
    char **sub_argv = argv + 1;
    optind = 0;
    while ((opt = getopt_long(sub_argc, sub_argv, "c:nvh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c': given = optarg; break;
        case 'n': nondefault = 1; break;
        case 'v': kt_log_set_debug(1); break;
        case 'h': usage(stdout); return EX_OK;
        default: usage(stderr); return EX_USAGE;
        }
    }
    int names_from = optind;
    if (strcmp(cmd, "config") && names_from < sub_argc) {
        fprintf(stderr, "ktrelay %s: unexpected argument '%s'\n", cmd, sub_argv[names_from]);
        return EX_USAGE;
    }
    if (!strcmp(cmd, "run")) {
        struct kt_runtime *rt;
        int is_default;
        const char *dir = kt_cli_config_dir(given, &is_default);
        if (is_default && make_default_config(DEFAULT_DIR) < 0) {
            kt_err("fatal: cannot create the default configuration in ./%s: %s; run ktrelay in a directory "
                   "you can write to, or give -c DIR", DEFAULT_DIR, strerror(errno));
            return EX_CANTCREAT;
        }
        if (load_runtime(dir, &rt) < 0) {
            kt_err("fatal: configuration errors in %s; `ktrelay check-config -c %s` lists them", dir, dir);
            return EX_CONFIG;
        }
        if (start_logging(rt) < 0) {
            kt_runtime_unref(rt);
            return EX_CANTCREAT;
        }
        int lrc = instance_lock(rt);
        if (lrc < 0) {
            kt_runtime_unref(rt);
            return lrc == -EWOULDBLOCK ? EX_TEMPFAIL : EX_CANTCREAT;
        }
        kt_master_keep_lock(lrc);
        /* the worker processes serve ktrelay_metrics_address (their counters) */
        return start_error_code(kt_master_run(rt, dir));
    }
    const char *dir = kt_cli_config_dir_existing(given, "ktrelay");
    if (!dir)
        return EX_CONFIG;
    if (!strcmp(cmd, "check-config")) {
        struct kt_runtime *rt;
        if (load_runtime(dir, &rt) < 0) {
            fprintf(stderr, "ktrelay: %s: configuration has errors\n", dir);
            return EX_CONFIG;
        }
        kt_runtime_unref(rt);
        printf("ktrelay: %s: configuration OK\n", dir);
        return EX_OK;
    }
    /* config */
    struct kt_config *cfg;
    if (kt_config_load(dir, &cfg) < 0)
        return EX_CONFIG;
    rc = EX_OK;
    if (names_from >= sub_argc) {
        kt_config_print(cfg, stdout, nondefault);
    } else {
        for (int i = names_from; i < sub_argc; i++)
            if (kt_config_print_param(cfg, stdout, sub_argv[i]) < 0) {
                const char *hint = kt_param_suggest(sub_argv[i]);
                fprintf(stderr, "ktrelay: warning: %s: unknown parameter%s%s%s\n", sub_argv[i],
                        hint ? " (did you mean " : "", hint ? hint : "", hint ? "?)" : "");
                rc = EX_USAGE;
            }
    }
    kt_config_free(cfg);
    return rc;
}
