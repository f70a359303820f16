/* A 2 ms SIGALRM timer with a handler *without* SA_RESTART, while the main thread blocks in
 * read(stdin): every tick must interrupt the read with EINTR, also a tick that fired while the
 * process was held. A worker thread spins. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static volatile sig_atomic_t ticks;
static void on_alarm(int sig) { (void)sig; ticks++; }
static void *spin(void *arg) { (void)arg; for (volatile unsigned long i = 0;; i++) {} return NULL; }

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, spin, NULL);
    struct itimerval it = {{0, 2000}, {0, 2000}};
    setitimer(ITIMER_REAL, &it, NULL);
    printf("pid=%d\n", getpid());
    printf("ready\n");
    fflush(stdout);
    long eintr = 0;
    for (;;) {
        char c;
        ssize_t r = read(0, &c, 1);
        if (r == -1 && errno == EINTR) {
            eintr++;
            continue;
        }
        if (r == 1) {
            printf("got=%c eintr=%ld ticks=%d\n", c, eintr, (int)ticks);
        } else {
            printf("unexpected r=%zd errno=%d\n", r, errno);
        }
        fflush(stdout);
        return 0;
    }
}
