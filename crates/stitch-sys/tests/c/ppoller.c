/* The main thread (the one remote syscalls run in) waits in ppoll() on stdin with a temporary
 * signal mask that unblocks everything, while its own mask blocks SIGUSR2. When a line
 * arrives it reports what ppoll returned and whether SIGUSR2 is still blocked. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    sigset_t usr2, none, now;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    sigprocmask(SIG_BLOCK, &usr2, NULL);
    sigemptyset(&none);
    printf("pid=%d\nready\n", getpid());
    fflush(stdout);
    struct pollfd p = {.fd = 0, .events = POLLIN};
    int r = ppoll(&p, 1, NULL, &none);
    int e = r < 0 ? errno : 0;
    char line[64];
    if (r > 0 && read(0, line, sizeof line) < 0) return 1;
    sigprocmask(SIG_BLOCK, NULL, &now);
    printf("ppoll=%d errno=%d usr2-blocked=%d\n", r, e, sigismember(&now, SIGUSR2));
    fflush(stdout);
    return 0;
}
