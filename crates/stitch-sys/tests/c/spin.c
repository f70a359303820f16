/* N extra threads (argv[1]) spinning, plus the main thread spinning. Prints its pid and "ready". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile unsigned long counters[1024];
static volatile int started;

static void *spin(void *arg) {
    long i = (long)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) counters[i % 1024]++;
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 0;
    printf("pid=%d\n", getpid());
    fflush(stdout);
    for (long i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, spin, (void *)(i + 1)) != 0) {
            printf("error: pthread_create\n");
            return 1;
        }
    }
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < n) usleep(100);
    printf("ready\n");
    fflush(stdout);
    for (;;) counters[0]++;
}
