/* GET /metrics over HTTP with libmicrohttpd: one internal thread polls with
 * epoll and answers every connection itself (never a thread per request);
 * at most 32 connections, 10 s idle limit. Anything but GET /metrics gets
 * 404 (405 for another method on /metrics). The address is
 * ktrelay_metrics_address; the endpoint has no authentication, so bind it to
 * loopback or a management network. */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "core/alloc.h"
#include "core/log.h"
#include "metrics/metrics.h"

static struct MHD_Daemon *daemon_handle;

int kt_metrics_parse_address(const char *text, char *host, size_t hostlen, unsigned *port, char *err,
                             size_t errlen)
{
    const char *colon;
    if (text[0] == '[') {
        const char *close = strchr(text, ']');
        if (!close || close[1] != ':') {
            kt_set_err(err, errlen, "\"%s\": expected [address]:port", text);
            return -EINVAL;
        }
        snprintf(host, hostlen, "%.*s", (int)(close - text - 1), text + 1);
        colon = close + 1;
    } else {
        colon = strrchr(text, ':');
        if (!colon) {
            kt_set_err(err, errlen, "\"%s\": expected host:port", text);
            return -EINVAL;
        }
        snprintf(host, hostlen, "%.*s", (int)(colon - text), text);
    }
    char *end;
    unsigned long p = strtoul(colon + 1, &end, 10);
    if (!colon[1] || *end || p == 0 || p > 65535) {
        kt_set_err(err, errlen, "\"%s\": bad port", text);
        return -EINVAL;
    }
    *port = (unsigned)p;
    return 0;
}

static enum MHD_Result answer(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                              const char *version, const char *upload_data, size_t *upload_data_size,
                              void **req_cls)
{
    struct MHD_Response *resp;
    unsigned status;
    if (strcmp(url, "/metrics") != 0) {
        static const char nf[] = "not found; the metrics are at /metrics\n";
        resp = MHD_create_response_from_buffer(sizeof(nf) - 1, (void *)nf, MHD_RESPMEM_PERSISTENT);
        status = MHD_HTTP_NOT_FOUND;
    } else if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        static const char na[] = "only GET\n";
        resp = MHD_create_response_from_buffer(sizeof(na) - 1, (void *)na, MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(resp, "Allow", "GET, HEAD");
        status = MHD_HTTP_METHOD_NOT_ALLOWED;
    } else {
        size_t len;
        char *text = kt_metrics_render(&len);
        resp = MHD_create_response_from_buffer_with_free_callback(len, text, kt_free);
        MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
        status = MHD_HTTP_OK;
    }
    if (!resp)
        return MHD_NO;
    enum MHD_Result r = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return r;
}

int kt_metrics_http_start(const char *address, char *err, size_t errlen)
{
    char host[256];
    unsigned port;
    int rc = kt_metrics_parse_address(address, host, sizeof(host), &port, err, errlen);
    if (rc < 0)
        return rc;
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV }, *ai;
    char portstr[8];
    snprintf(portstr, sizeof(portstr), "%u", port);
    int g = getaddrinfo(host[0] ? host : NULL, portstr, &hints, &ai);
    if (g != 0) {
        kt_set_err(err, errlen, "ktrelay_metrics_address %s: %s", address, gai_strerror(g));
        return -EINVAL;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    daemon_handle = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, answer, NULL,
                                     MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                                     /* SO_REUSEPORT: a reload's new worker generation binds
                                      * while the old one still serves */
                                     MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1,
                                     MHD_OPTION_CONNECTION_LIMIT, (unsigned)32,
                                     MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                                     MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!daemon_handle) {
        kt_set_err(err, errlen, "cannot serve metrics on %s (address in use or not local?)", address);
        return -EADDRNOTAVAIL;
    }
    kt_info("metrics: serving Prometheus text at http://%s/metrics", address);
    return 0;
}

void kt_metrics_http_stop(void)
{
    if (daemon_handle) {
        MHD_stop_daemon(daemon_handle);
        daemon_handle = NULL;
    }
}
