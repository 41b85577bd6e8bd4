/* The queue manager: one thread with its own io_uring loop that delivers
 * what is in the queue, locally (Maildir) or over SMTP, with per-destination
 * concurrency, connection reuse, retries with backoff, expiry and bounces. */
#ifndef KTRELAY_QMGR_H
#define KTRELAY_QMGR_H

struct kt_runtime;
struct kt_qmgr;

/* Scan the queue (crash recovery) and start the thread. 0 or -errno (configuration errors);
 * 0 with *out NULL and a warning when the queue directory cannot be created. */
int kt_qmgr_start(struct kt_runtime *rt, struct kt_qmgr **out);
/* A message was queued in-process: scan now instead of at the next tick. Thread-safe; no-op without a manager. */
void kt_qmgr_wakeup(void);
/* Hand the queue manager a new configuration generation (SIGHUP). It takes its own reference and adopts
 * it on its thread: routing, retry times and outbound client settings apply from the next delivery. A
 * reload does not move queue_directory or change ktrelay_dns_servers. NULL q is fine. */
void kt_qmgr_reload(struct kt_qmgr *q, struct kt_runtime *rt);
/* Stop: finish or drop deliveries in flight (undelivered recipients stay queued), join, free. NULL is fine. */
void kt_qmgr_stop(struct kt_qmgr *q);

#endif
