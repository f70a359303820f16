/* One thread sits in vfork() for ~1 s (the kernel waits for the child killably: a ptrace
 * interrupt cannot stop it); the main thread spins. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void *vforking(void *arg) {
    (void)arg;
    usleep(200000);
    printf("vforking\n");
    fflush(stdout);
    pid_t p = vfork();
    if (p == 0) {
        struct timespec ts = {1, 200000000};
        syscall(SYS_nanosleep, &ts, NULL);
        _exit(0);
    }
    printf("vfork-done\n");
    fflush(stdout);
    return NULL;
}

int main(void) {
    pthread_t t;
    printf("pid=%d\n", getpid());
    pthread_create(&t, NULL, vforking, NULL);
    printf("ready\n");
    fflush(stdout);
    for (volatile unsigned long i = 0;; i++) {}
}
