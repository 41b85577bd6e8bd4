/* Checks that OpenSSL hands a TLS connection to kernel TLS: a server and a forked client talk over
 * loopback TCP with SSL_OP_ENABLE_KTLS and one AES-128-GCM suite, echo 256 KiB and compare it.
 * Usage: ktls_check 1.2|1.3 CERT KEY. Exits 0 only if both ends report kTLS for sending, and for TLS 1.2
 * also for receiving (OpenSSL 3.0 does not offload TLS 1.3 receive), and the data came back intact. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHUNK 16384
#define CHUNKS 16

static int tls13;

static SSL_CTX *make_ctx(int server, const char *cert, const char *key)
{
	SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
	int v = tls13 ? TLS1_3_VERSION : TLS1_2_VERSION;

	if (!ctx || !SSL_CTX_set_min_proto_version(ctx, v) || !SSL_CTX_set_max_proto_version(ctx, v))
		return NULL;
	SSL_CTX_set_options(ctx, SSL_OP_ENABLE_KTLS);
	if (!SSL_CTX_set_cipher_list(ctx, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256") ||
	    !SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256"))
		return NULL;
	if (server && (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
		       SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1))
		return NULL;
	return ctx;
}

static int read_full(SSL *ssl, unsigned char *buf, size_t len)
{
	size_t got = 0, n;

	while (got < len) {
		if (!SSL_read_ex(ssl, buf + got, len - got, &n))
			return 0;
		got += n;
	}
	return 1;
}

/* Runs one end on connected socket fd; the client sends chunks, the server echoes them. */
static int run_end(int server, int fd, const char *cert, const char *key)
{
	const char *who = server ? "server" : "client";
	unsigned char out[CHUNK], in[CHUNK];
	SSL_CTX *ctx = make_ctx(server, cert, key);
	SSL *ssl = ctx ? SSL_new(ctx) : NULL;
	int tx, rx, ok = 1;

	if (!ssl || !SSL_set_fd(ssl, fd) || (server ? SSL_accept(ssl) : SSL_connect(ssl)) != 1) {
		fprintf(stderr, "%s: handshake failed\n", who);
		ERR_print_errors_fp(stderr);
		return 1;
	}
	tx = BIO_get_ktls_send(SSL_get_wbio(ssl));
	rx = BIO_get_ktls_recv(SSL_get_rbio(ssl));
	printf("%s: %s %s ktls_tx=%d ktls_rx=%d\n", who, SSL_get_version(ssl), SSL_get_cipher(ssl), tx, rx);
	for (int i = 0; i < CHUNKS && ok; i++) {
		size_t n;

		memset(out, 'a' + i, sizeof(out));
		if (server)
			ok = SSL_read_ex(ssl, in, sizeof(in), &n) && SSL_write_ex(ssl, in, n, &n);
		else
			ok = SSL_write_ex(ssl, out, sizeof(out), &n) && read_full(ssl, in, sizeof(in)) &&
			     memcmp(in, out, sizeof(in)) == 0;
	}
	if (!ok) {
		fprintf(stderr, "%s: data exchange failed\n", who);
		ERR_print_errors_fp(stderr);
	}
	SSL_shutdown(ssl);
	SSL_free(ssl);
	SSL_CTX_free(ctx);
	return ok && tx == 1 && (tls13 || rx == 1) ? 0 : 1;
}

int main(int argc, char **argv)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(sa);
	int lfd, fd, status, rc;
	pid_t pid;

	if (argc != 4 || (strcmp(argv[1], "1.2") != 0 && strcmp(argv[1], "1.3") != 0)) {
		fprintf(stderr, "usage: %s 1.2|1.3 CERT KEY\n", argv[0]);
		return 2;
	}
	tls13 = strcmp(argv[1], "1.3") == 0;
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&sa, &len) < 0) {
		perror("listen");
		return 1;
	}
	fflush(stdout);
	pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		close(lfd);
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			perror("connect");
			_exit(1);
		}
		rc = run_end(0, fd, argv[2], argv[3]);
		fflush(stdout);
		_exit(rc);
	}
	fd = accept(lfd, NULL, NULL);
	rc = fd < 0 ? 1 : run_end(1, fd, argv[2], argv[3]);
	if (fd >= 0)
		close(fd);
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		rc = 1;
	return rc;
}
