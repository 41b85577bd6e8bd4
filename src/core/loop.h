/* Per-thread io_uring event loop. Every submission carries a struct kt_op
 * pointer as user_data; its callback runs when the completion is reaped. */
#ifndef KTRELAY_LOOP_H
#define KTRELAY_LOOP_H

#include <liburing.h>
#include <stdint.h>

struct kt_op;
typedef void (*kt_op_cb)(struct kt_op *op, int res, unsigned flags);

struct kt_op {
    kt_op_cb cb;
};

struct kt_loop {
    struct io_uring ring;
    unsigned pending_sqes;     /* prepared but not yet submitted */
    int stop;                  /* leave kt_loop_run after this iteration */
};

int kt_loop_init(struct kt_loop *loop, unsigned entries);
void kt_loop_fini(struct kt_loop *loop);
/* Never fails: when the submission queue is full it is flushed first. */
struct io_uring_sqe *kt_loop_sqe(struct kt_loop *loop, struct kt_op *op);
/* Submit, wait for at least one completion (or the timeout), dispatch all available completions. */
int kt_loop_run_once(struct kt_loop *loop, unsigned timeout_ms);

#endif
