/* Service manager notifications (sd_notify(3), libsystemd) for a Type=notify
 * unit: READY once the listeners accept, RELOADING while a SIGHUP reload runs
 * (with MONOTONIC_USEC, as systemd 253+ asks), STOPPING when a stop begins,
 * and a STATUS line. Without $NOTIFY_SOCKET (not started by systemd) every
 * call does nothing. Errors are ignored: a service manager that cannot be
 * told must not stop the mail service. */
#ifndef KTRELAY_NOTIFY_H
#define KTRELAY_NOTIFY_H

void kt_notify_ready(const char *status);
void kt_notify_reloading(void);
void kt_notify_stopping(void);

#endif
