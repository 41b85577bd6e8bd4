/* Scheduling pieces of qmgr.c, on a clock the test sets: the retry time
 * after each failure (minimal_backoff_time doubling up to
 * maximal_backoff_time), the deferred heap giving messages back in next_try
 * order and none before its time, maximal_queue_lifetime and
 * bounce_queue_lifetime expiry, delay_warning_time, and the per-destination
 * concurrency window's feedback between 1 and the limit. No sockets, no
 * queue files: the .c is included to reach its statics. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../../src/queue/qmgr.c"

#define T0 ((time_t)1800000000)   /* an arbitrary start of the test clock */

static time_t fake_now;

static time_t fake_clock(void)
{
    return fake_now;
}

static int setup(void **state)
{
    (void)state;
    fake_now = T0;
    qmgr_clock = fake_clock;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    qmgr_clock = qmgr_clock_wall;
    return 0;
}

/* Postfix's defaults: 300s, 4000s, 5d, 5d... except bounce_queue_lifetime, set apart to tell them apart. */
static struct kt_qmgr_settings defaults(void)
{
    struct kt_qmgr_settings set = { 0 };
    set.queue_directory = "/nonexistent";
    set.minimal_backoff_time = 300;
    set.maximal_backoff_time = 4000;
    set.queue_run_delay = 300;
    set.maximal_queue_lifetime = 5 * 86400;
    set.bounce_queue_lifetime = 2 * 86400;
    set.delay_warning_time = 0;
    set.destination_concurrency_limit = 20;
    set.initial_destination_concurrency = 5;
    return set;
}

/* One message with one pending recipient that has no defer reason (so no status file is written). */
struct fixture_msg {
    struct kt_qrcpt rcpt;
    struct kt_qmsg qm;
    struct msg m;
};

static void fixture_init(struct fixture_msg *f, const char *id, const char *sender, time_t arrival)
{
    memset(f, 0, sizeof(*f));
    f->rcpt.addr = "rcpt@example.test";
    f->rcpt.state = KT_QR_PENDING;
    f->qm.id = (char *)id;
    f->qm.sender = (char *)sender;
    f->qm.arrival = arrival;
    f->qm.n_rcpts = 1;
    f->qm.rcpts = &f->rcpt;
    f->m.q = &f->qm;
    f->m.heap_idx = NOT_IN_HEAP;
}

static void test_clock_seam(void **state)
{
    (void)state;
    struct fixture_msg f;
    fixture_init(&f, "A1", "s@example.test", T0 - 42);
    assert_int_equal(qmgr_now(), T0);
    assert_true(delay_of(&f.m) == 42.0);
    fake_now += 1000;
    assert_true(delay_of(&f.m) == 1042.0);
}

/* minimal_backoff_time after the 1st failure, doubled per failure, capped at maximal_backoff_time. */
static void test_backoff_sequence(void **state)
{
    (void)state;
    struct kt_qmgr_settings set = defaults();
    static const long long want[] = { 300, 600, 1200, 2400, 4000, 4000, 4000 };
    for (unsigned i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        assert_int_equal(retry_backoff(&set, i + 1), want[i]);
    /* many failures: still the cap, no overflow */
    assert_int_equal(retry_backoff(&set, 1000000), 4000);
    /* maximal equal to minimal: never doubles */
    set.maximal_backoff_time = 300;
    assert_int_equal(retry_backoff(&set, 1), 300);
    assert_int_equal(retry_backoff(&set, 5), 300);
    /* a cap that is not a power-of-two multiple */
    set.minimal_backoff_time = 7;
    set.maximal_backoff_time = 50;
    assert_int_equal(retry_backoff(&set, 1), 7);
    assert_int_equal(retry_backoff(&set, 2), 14);
    assert_int_equal(retry_backoff(&set, 3), 28);
    assert_int_equal(retry_backoff(&set, 4), 50);
}

/* The end of a failed round (msg_round_done) puts the message in the heap at now + backoff, by the test clock. */
static void test_round_done_next_try(void **state)
{
    (void)state;
    struct kt_qmgr_settings set = defaults();
    struct kt_qmgr q = { 0 };
    q.set = &set;
    q.qdir = "/nonexistent";
    struct fixture_msg f;
    fixture_init(&f, "B1", "s@example.test", T0);
    static const long long want[] = { 300, 600, 1200, 2400, 4000, 4000 };
    for (unsigned i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        msg_round_done(&q, &f.m);
        assert_int_equal(f.m.attempts, i + 1);
        assert_int_equal(f.m.next_try, fake_now + (time_t)want[i]);
        assert_int_equal(q.heap_n, 1);
        assert_ptr_equal(q.heap[0], &f.m);
        /* not due one second early, due on the second */
        assert_null(deferred_due(&q, f.m.next_try - 1, 0));
        assert_ptr_equal(deferred_due(&q, f.m.next_try, 0), &f.m);
        fake_now = f.m.next_try;
        heap_remove(&q, &f.m);   /* as msg_start does */
        assert_int_equal(f.m.heap_idx, NOT_IN_HEAP);
    }
    kt_free(q.heap);
}

/* Every parent's next_try is at most its children's, and each message knows its place. */
static int heap_valid(const struct kt_qmgr *q)
{
    for (size_t i = 0; i < q->heap_n; i++) {
        if (q->heap[i]->heap_idx != i)
            return 0;
        if (i > 0 && q->heap[(i - 1) / 2]->next_try > q->heap[i]->next_try)
            return 0;
    }
    return 1;
}

/* Removing from the middle can need the moved last element to go up: [1 10 2 11 12 3 4] less 11. */
static void test_heap_remove_middle(void **state)
{
    (void)state;
    struct kt_qmgr_settings set = defaults();
    struct kt_qmgr q = { 0 };
    q.set = &set;
    static const int tries[] = { 1, 10, 2, 11, 12, 3, 4 };
    struct fixture_msg f[7];
    for (unsigned i = 0; i < 7; i++) {
        fixture_init(&f[i], "R", "s@example.test", T0);
        f[i].m.next_try = T0 + tries[i];
        heap_push(&q, &f[i].m);
        assert_true(heap_valid(&q));
    }
    assert_int_equal(f[3].m.heap_idx, 3);
    heap_remove(&q, &f[3].m);
    assert_int_equal(f[3].m.heap_idx, NOT_IN_HEAP);
    assert_true(heap_valid(&q));
    assert_int_equal(f[6].m.heap_idx, 1);   /* 4 moved up over 10 */
    heap_remove(&q, &f[3].m);                 /* not in the heap: no change */
    assert_int_equal(q.heap_n, 6);
    assert_true(heap_valid(&q));
    kt_free(q.heap);
}

/* The heap yields deferred messages in next_try order, each exactly when the clock reaches it. */
static void test_heap_order(void **state)
{
    (void)state;
    struct kt_qmgr_settings set = defaults();
    struct kt_qmgr q = { 0 };
    q.set = &set;
    enum { N = 300 };
    static struct fixture_msg f[N];
    /* next_try offsets in a scrambled order, with ties */
    for (unsigned i = 0; i < N; i++) {
        fixture_init(&f[i], "H", "s@example.test", T0);
        f[i].m.next_try = T0 + 1 + (time_t)((i * 7919u) % 200u);
        heap_push(&q, &f[i].m);
    }
    assert_int_equal(q.heap_n, N);
    assert_true(heap_valid(&q));
    /* removing from the middle keeps the heap valid */
    heap_remove(&q, &f[17].m);
    assert_true(heap_valid(&q));
    heap_remove(&q, &f[250].m);
    assert_true(heap_valid(&q));
    assert_int_equal(q.heap_n, N - 2);
    assert_null(deferred_due(&q, qmgr_now(), 0));
    /* a flush takes one regardless of time */
    assert_non_null(deferred_due(&q, qmgr_now(), 1));
    /* while stopping nothing is started */
    q.stopping = 1;
    assert_null(deferred_due(&q, qmgr_now(), 1));
    q.stopping = 0;
    size_t got = 0;
    time_t last = 0;
    for (int step = 0; step < 220; step++) {
        fake_now++;
        struct msg *m;
        while ((m = deferred_due(&q, qmgr_now(), 0))) {
            assert_true(m->next_try <= qmgr_now());
            assert_true(m->next_try == qmgr_now());   /* not held back after its time */
            assert_true(m->next_try >= last);
            last = m->next_try;
            heap_remove(&q, m);
            assert_true(heap_valid(&q));
            got++;
        }
        if (q.heap_n > 0)
            assert_true(q.heap[0]->next_try > qmgr_now());
    }
    assert_int_equal(got, N - 2);
    assert_int_equal(q.heap_n, 0);
    assert_null(deferred_due(&q, qmgr_now(), 1));
    kt_free(q.heap);
}

/* maximal_queue_lifetime for senders, bounce_queue_lifetime for the null sender; due on the second. */
static void test_expiry(void **state)
{
    (void)state;
    struct kt_qmgr_settings set = defaults();
    struct fixture_msg f, b;
    fixture_init(&f, "E1", "s@example.test", T0);
    fixture_init(&b, "E2", "", T0);
    assert_int_equal(queue_lifetime(&set, &f.qm), 5 * 86400);
    assert_int_equal(queue_lifetime(&set, &b.qm), 2 * 86400);
    assert_false(msg_expired(&set, &f.qm, T0));
    assert_false(msg_expired(&set, &b.qm, T0 + 2 * 86400 - 1));
    assert_true(msg_expired(&set, &b.qm, T0 + 2 * 86400));
    assert_false(msg_expired(&set, &f.qm, T0 + 2 * 86400));
    assert_false(msg_expired(&set, &f.qm, T0 + 5 * 86400 - 1));
    assert_true(msg_expired(&set, &f.qm, T0 + 5 * 86400));
    assert_true(msg_expired(&set, &f.qm, T0 + 9 * 86400));
    /* lifetime 0: bounce at the first failure (Postfix: no retries) */
    set.maximal_queue_lifetime = 0;
    set.bounce_queue_lifetime = 0;
    assert_true(msg_expired(&set, &f.qm, T0));
    assert_true(msg_expired(&set, &b.qm, T0));
}

/* delay_warning_time: once, not for the null sender, off at 0. */
static void test_delay_warning(void **state)
{
    (void)state;
    struct kt_qmgr_settings set = defaults();
    struct fixture_msg f, b;
    fixture_init(&f, "W1", "s@example.test", T0);
    fixture_init(&b, "W2", "", T0);
    assert_false(delay_warning_due(&set, &f.qm, T0 + 10 * 86400));   /* 0 = off */
    set.delay_warning_time = 4 * 3600;
    assert_false(delay_warning_due(&set, &f.qm, T0 + 4 * 3600 - 1));
    assert_true(delay_warning_due(&set, &f.qm, T0 + 4 * 3600));
    assert_false(delay_warning_due(&set, &b.qm, T0 + 4 * 3600));
    f.qm.warned = 1;
    assert_false(delay_warning_due(&set, &f.qm, T0 + 5 * 3600));
}

static int near(double a, double b)
{
    return a - b < 1e-12 && b - a < 1e-12;
}

static struct dest *new_dest(struct kt_qmgr *q)
{
    return dest_get(q, "smtp:[127.0.0.1]:2525");
}

static void free_dests(struct kt_qmgr *q)
{
    struct dest *d, *next;
    for (d = q->dests; d; d = next) {
        next = d->next;
        kt_free(d->key);
        kt_free(d->host);
        kt_free(d);
    }
    q->dests = NULL;
}

/* The window starts at initial_destination_concurrency, +1/window per success, -1/window per failure,
 * within [1, destination_concurrency_limit]; dest_kick opens floor(window) connections. */
static void test_window_feedback(void **state)
{
    (void)state;
    struct kt_qmgr_settings set = defaults();
    struct kt_qmgr q = { 0 };
    q.set = &set;

    struct dest *d = new_dest(&q);
    assert_ptr_equal(new_dest(&q), d);   /* one per next hop */
    assert_string_equal(d->host, "127.0.0.1");
    assert_int_equal(d->port, 2525);
    assert_int_equal(d->mx, 0);
    assert_true(d->window == 5.0);
    /* growth: 5 + 1/5 = 5.2, ... the sixth success reaches 6 */
    dest_feedback(d, 1);
    assert_true(near(d->window, 5.2));
    for (int i = 2; i <= 5; i++)
        dest_feedback(d, 1);
    assert_int_equal((unsigned)d->window, 5);
    dest_feedback(d, 1);
    assert_int_equal((unsigned)d->window, 6);
    for (int i = 7; i <= 100; i++)
        dest_feedback(d, 1);
    assert_int_equal((unsigned)d->window, 15);
    /* capped at destination_concurrency_limit, exactly */
    for (int i = 0; i < 1000; i++)
        dest_feedback(d, 1);
    assert_true(d->window == 20.0);
    free_dests(&q);

    /* shrinking from the initial window: 4.8 after one failure, 3 after 5, 1 after 12, never below 1 */
    d = new_dest(&q);
    dest_feedback(d, 0);
    assert_true(near(d->window, 4.8));
    for (int i = 2; i <= 4; i++)
        dest_feedback(d, 0);
    assert_int_equal((unsigned)d->window, 4);
    dest_feedback(d, 0);
    assert_int_equal((unsigned)d->window, 3);
    for (int i = 6; i <= 12; i++)
        dest_feedback(d, 0);
    assert_int_equal((unsigned)d->window, 1);
    dest_feedback(d, 0);   /* 1.46 - 1/1.46 would be 0.78 */
    assert_true(d->window == 1.0);
    for (int i = 0; i < 100; i++) {
        dest_feedback(d, 0);
        assert_true(d->window == 1.0);
    }
    /* and from 1 one success gives 2 */
    dest_feedback(d, 1);
    assert_true(d->window == 2.0);
    free_dests(&q);

    /* a limit of 1 pins the window */
    set.destination_concurrency_limit = 1;
    set.initial_destination_concurrency = 1;
    d = new_dest(&q);
    assert_true(d->window == 1.0);
    dest_feedback(d, 1);
    assert_true(d->window == 1.0);
    dest_feedback(d, 0);
    assert_true(d->window == 1.0);
    free_dests(&q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_clock_seam, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backoff_sequence, setup, teardown),
        cmocka_unit_test_setup_teardown(test_round_done_next_try, setup, teardown),
        cmocka_unit_test_setup_teardown(test_heap_remove_middle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_heap_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delay_warning, setup, teardown),
        cmocka_unit_test_setup_teardown(test_window_feedback, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
