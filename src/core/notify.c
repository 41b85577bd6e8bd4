/* sd_notify(3) wrappers (see notify.h). */
#include <systemd/sd-daemon.h>
#include <time.h>

#include "core/notify.h"

void kt_notify_ready(const char *status)
{
    sd_notifyf(0, "READY=1\nSTATUS=%s", status ? status : "accepting mail");
}

void kt_notify_reloading(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading the configuration",
               (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000);
}

void kt_notify_stopping(void)
{
    sd_notify(0, "STOPPING=1\nSTATUS=stopping: finishing the sessions in a mail transaction");
}
