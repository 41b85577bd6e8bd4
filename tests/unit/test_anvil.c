/* anvil accounting: counts per service and address, windows, and counting
 * from several threads at once. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#include <cmocka.h>

#include "smtpd/anvil.h"

static void test_counts(void **state)
{
    unsigned count, rate;
    kt_anvil_connect("smtp", "192.0.2.1", 60, &count, &rate);
    assert_int_equal(count, 1);
    assert_int_equal(rate, 1);
    kt_anvil_connect("smtp", "192.0.2.1", 60, &count, &rate);
    assert_int_equal(count, 2);
    assert_int_equal(rate, 2);
    /* another service, another address: separate */
    kt_anvil_connect("submission", "192.0.2.1", 60, &count, &rate);
    assert_int_equal(count, 1);
    kt_anvil_connect("smtp", "192.0.2.2", 60, &count, &rate);
    assert_int_equal(count, 1);
    kt_anvil_disconnect("smtp", "192.0.2.1");
    kt_anvil_connect("smtp", "192.0.2.1", 60, &count, &rate);
    assert_int_equal(count, 2);
    assert_int_equal(rate, 3);   /* the rate does not go down with a disconnect */
    assert_int_equal(kt_anvil_event("smtp", "192.0.2.1", KT_ANVIL_MAIL, 60), 1);
    assert_int_equal(kt_anvil_event("smtp", "192.0.2.1", KT_ANVIL_MAIL, 60), 2);
    assert_int_equal(kt_anvil_peek("smtp", "192.0.2.1", KT_ANVIL_MAIL, 60), 2);
    assert_int_equal(kt_anvil_peek("smtp", "192.0.2.9", KT_ANVIL_NEWTLS, 60), 0);
}

static void test_window(void **state)
{
    assert_int_equal(kt_anvil_event("smtp", "192.0.2.50", KT_ANVIL_RCPT, 1), 1);
    assert_int_equal(kt_anvil_event("smtp", "192.0.2.50", KT_ANVIL_RCPT, 1), 2);
    /* a window of 1 s ends within 2 s of the monotonic clock's seconds */
    assert_int_equal(kt_anvil_peek("smtp", "192.0.2.50", KT_ANVIL_RCPT, 1), 2);
    for (int i = 0; i < 100 && kt_anvil_peek("smtp", "192.0.2.50", KT_ANVIL_RCPT, 1) != 0; i++)
        usleep(50000);
    assert_int_equal(kt_anvil_event("smtp", "192.0.2.50", KT_ANVIL_RCPT, 1), 1);
}

static void *hammer(void *arg)
{
    unsigned count, rate;
    for (int i = 0; i < 10000; i++) {
        kt_anvil_connect("smtp", "192.0.2.77", 3600, &count, &rate);
        kt_anvil_disconnect("smtp", "192.0.2.77");
        char addr[32];
        snprintf(addr, sizeof(addr), "10.%d.%d.%d", (int)(intptr_t)arg, i / 256, i % 256);
        kt_anvil_event("smtp", addr, KT_ANVIL_AUTH, 3600);
    }
    return NULL;
}

static void test_threads(void **state)
{
    pthread_t t[4];
    for (intptr_t i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, hammer, (void *)i);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    unsigned count, rate;
    kt_anvil_connect("smtp", "192.0.2.77", 3600, &count, &rate);
    assert_int_equal(count, 1);
    assert_int_equal(rate, 40001);
    assert_true(kt_anvil_size() >= 40000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counts),
        cmocka_unit_test(test_window),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
