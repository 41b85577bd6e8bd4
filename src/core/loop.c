/* io_uring event loop: batched submission, batched completion reaping
 * (one cq_advance per batch), callbacks looked up through user_data. */
#include <errno.h>
#include <string.h>

#include "core/log.h"
#include "core/loop.h"

int kt_loop_init(struct kt_loop *loop, unsigned entries)
{
    struct io_uring_params p;

    memset(loop, 0, sizeof(*loop));
    memset(&p, 0, sizeof(p));
    /* The completion queue must absorb bursts of multishot accepts and socket
     * completions without overflowing. */
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
    p.cq_entries = entries * 4;
    int ret = io_uring_queue_init_params(entries, &loop->ring, &p);
    if (ret < 0)
        return ret;
    /* Splice and buffered file writes run in io-wq workers: bound them so a
     * burst of large messages cannot spawn threads without limit. */
    unsigned max_workers[2] = { 8, 8 };
    io_uring_register_iowq_max_workers(&loop->ring, max_workers);
    return 0;
}

void kt_loop_fini(struct kt_loop *loop)
{
    io_uring_queue_exit(&loop->ring);
}

struct io_uring_sqe *kt_loop_sqe(struct kt_loop *loop, struct kt_op *op)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&loop->ring);
    while (!sqe) {
        int ret = io_uring_submit(&loop->ring);
        if (ret < 0 && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN)
            kt_err("io_uring_submit: %s", strerror(-ret));
        loop->pending_sqes = 0;
        sqe = io_uring_get_sqe(&loop->ring);
    }
    io_uring_sqe_set_data(sqe, op);
    loop->pending_sqes++;
    return sqe;
}

int kt_loop_run_once(struct kt_loop *loop, unsigned timeout_ms)
{
    struct __kernel_timespec ts = { .tv_sec = timeout_ms / 1000, .tv_nsec = (long long)(timeout_ms % 1000) * 1000000 };
    struct io_uring_cqe *cqe;
    unsigned head, count = 0;

    int ret = io_uring_submit_and_wait_timeout(&loop->ring, &cqe, 1, &ts, NULL);
    loop->pending_sqes = 0;
    if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN)
        return ret;
    io_uring_for_each_cqe(&loop->ring, head, cqe) {
        struct kt_op *op = io_uring_cqe_get_data(cqe);
        count++;
        if (op && op->cb)
            op->cb(op, cqe->res, cqe->flags);
    }
    io_uring_cq_advance(&loop->ring, count);
    return (int)count;
}
