/* Three threads blocked in read(stdin), nanosleep(1.5 s) and futex wait. Each reports how its
 * syscall ended; the reader wakes the futex waiter after it got its data. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int futex_word;

static long ms_since(struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
}

static void *reader(void *arg) {
    (void)arg;
    char buf[64];
    ssize_t n = read(0, buf, sizeof buf - 1);
    if (n < 0) {
        printf("read-error errno=%d\n", errno);
    } else {
        buf[n] = 0;
        char *nl = strchr(buf, '\n');
        if (nl) *nl = 0;
        printf("read:%s\n", buf);
    }
    fflush(stdout);
    __atomic_store_n(&futex_word, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &futex_word, FUTEX_WAKE, 1, NULL, NULL, 0);
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    struct timespec t0, req = {1, 500000000};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int r = nanosleep(&req, NULL);
    printf("slept:%ld r=%d errno=%d\n", ms_since(&t0), r, r ? errno : 0);
    fflush(stdout);
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    while (__atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == 0) {
        long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT, 0, NULL, NULL, 0);
        if (r == -1 && errno != EAGAIN) {
            printf("futex-error errno=%d\n", errno);
            fflush(stdout);
        }
    }
    printf("futex:woken\n");
    fflush(stdout);
    return NULL;
}

int main(void) {
    pthread_t t[3];
    printf("pid=%d\n", getpid());
    fflush(stdout);
    pthread_create(&t[0], NULL, reader, NULL);
    pthread_create(&t[1], NULL, sleeper, NULL);
    pthread_create(&t[2], NULL, waiter, NULL);
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    printf("done\n");
    fflush(stdout);
    return 0;
}
