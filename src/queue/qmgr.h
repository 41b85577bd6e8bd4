/* The queue manager: one thread with its own io_uring loop that delivers
 * what is in the queue, locally (Maildir) or over SMTP, with per-destination
 * concurrency that follows success and failure, connection reuse, retries
 * with backoff, expiry and bounces. */
#ifndef KTRELAY_QMGR_H
#define KTRELAY_QMGR_H

struct kt_runtime;
struct kt_qmgr;
struct kt_delivery;

/* Load the queue from disk (crash recovery, the only directory scan) and start the thread; call it before
 * any SMTP session can queue mail. 0 or -errno (configuration errors); 0 with *out NULL and a warning when
 * the queue directory cannot be created. */
int kt_qmgr_start(struct kt_runtime *rt, struct kt_qmgr **out);
/* Hand the queue manager a new configuration generation (SIGHUP). It takes its own reference and adopts
 * it on its thread: routing, retry times and outbound client settings apply from the next delivery. A
 * reload does not move queue_directory or change ktrelay_dns_servers. NULL q is fine. */
void kt_qmgr_reload(struct kt_qmgr *q, struct kt_runtime *rt);
/* A session's queue file (kt_queue_delivery_new) is durable: hand its envelope to the queue manager, which
 * starts delivery from memory. Thread-safe; without a running manager the file waits for the next start. */
void kt_qmgr_submit(struct kt_delivery *d);
/* Stop: finish or drop deliveries in flight (undelivered recipients stay queued), join, free. NULL is fine. */
void kt_qmgr_stop(struct kt_qmgr *q);

#endif
