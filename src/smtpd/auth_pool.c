/* Password checks off the event loop. A few pool threads (started on first
 * use) take requests from one queue, run kt_sasl_check, and post the result
 * into the submitting worker's io_uring with IORING_OP_MSG_RING: the worker
 * sees an ordinary completion whose user_data is the request's kt_op, so no
 * lock or wake-up is shared with the loop. Each pool thread owns a tiny ring
 * only to send those messages.
 *
 * Also here: the per-address failure counter that slows down and then stops
 * password guessing across connections. */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/log.h"
#include "smtpd/sasl.h"

#define POOL_THREADS 4
#define FAIL_SLOTS 256
#define FAIL_WINDOW_S 600

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct kt_auth_req *head, *tail;
} pool = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL };

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void post_result(struct io_uring *ring, struct kt_auth_req *req, int result)
{
    int target = req->ring_fd;
    struct kt_op *op = &req->op;
    /* After a successful post the worker may free req at once: touch nothing of it below. */
    for (int attempt = 0; attempt < 100; attempt++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        struct io_uring_cqe *cqe;
        io_uring_prep_msg_ring(sqe, target, (unsigned)result, (__u64)(uintptr_t)op, 0);
        io_uring_submit(ring);
        if (io_uring_wait_cqe(ring, &cqe) < 0)
            continue;
        int res = cqe->res;
        io_uring_cqe_seen(ring, cqe);
        if (res >= 0)
            return;
        /* the target's completion queue is momentarily full: try again shortly */
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    kt_err("SASL: cannot deliver an authentication result to worker ring %d", target);
}

static void *pool_main(void *arg)
{
    struct io_uring ring;
    (void)arg;
    if (io_uring_queue_init(4, &ring, 0) < 0) {
        kt_err("SASL: auth thread cannot create its io_uring");
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&pool.mu);
        while (!pool.head)
            pthread_cond_wait(&pool.cv, &pool.mu);
        struct kt_auth_req *req = pool.head;
        pool.head = req->next;
        if (!pool.head)
            pool.tail = NULL;
        pthread_mutex_unlock(&pool.mu);
        post_result(&ring, req, kt_sasl_check(req));
    }
    return NULL;
}

static void pool_start(void)
{
    for (int i = 0; i < POOL_THREADS; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, pool_main, NULL) == 0) {
            pthread_setname_np(t, "ktrelay-auth");
            pthread_detach(t);
        }
    }
}

void kt_auth_submit(struct kt_auth_req *req)
{
    pthread_once(&pool_once, pool_start);
    req->next = NULL;
    pthread_mutex_lock(&pool.mu);
    if (pool.tail)
        pool.tail->next = req;
    else
        pool.head = req;
    pool.tail = req;
    pthread_cond_signal(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
}

/* ---- failures per client address ---- */

static struct {
    pthread_mutex_t mu;
    struct { char addr[64]; unsigned count; time_t last; } slot[FAIL_SLOTS];
} fails = { .mu = PTHREAD_MUTEX_INITIALIZER };

unsigned kt_auth_fail_record(const char *client_addr)
{
    time_t now = time(NULL);
    size_t free_slot = FAIL_SLOTS, oldest = 0;
    unsigned count;

    pthread_mutex_lock(&fails.mu);
    for (size_t i = 0; i < FAIL_SLOTS; i++) {
        if (fails.slot[i].count && now - fails.slot[i].last > FAIL_WINDOW_S)
            fails.slot[i].count = 0;
        if (fails.slot[i].count && strcmp(fails.slot[i].addr, client_addr) == 0) {
            fails.slot[i].last = now;
            count = ++fails.slot[i].count;
            pthread_mutex_unlock(&fails.mu);
            return count;
        }
        if (!fails.slot[i].count && free_slot == FAIL_SLOTS)
            free_slot = i;
        if (fails.slot[i].last < fails.slot[oldest].last)
            oldest = i;
    }
    /* full: the least recently failing address gives way */
    size_t i = free_slot < FAIL_SLOTS ? free_slot : oldest;
    snprintf(fails.slot[i].addr, sizeof(fails.slot[i].addr), "%s", client_addr);
    fails.slot[i].count = 1;
    fails.slot[i].last = now;
    pthread_mutex_unlock(&fails.mu);
    return 1;
}

void kt_auth_fail_forget(const char *client_addr)
{
    pthread_mutex_lock(&fails.mu);
    for (size_t i = 0; i < FAIL_SLOTS; i++)
        if (fails.slot[i].count && strcmp(fails.slot[i].addr, client_addr) == 0)
            fails.slot[i].count = 0;
    pthread_mutex_unlock(&fails.mu);
}
