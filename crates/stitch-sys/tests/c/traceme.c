/* The child asks to be traced by its parent (PTRACE_TRACEME), prints its pid and spins. */
#include <signal.h>
#include <stdio.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(void) {
    pid_t child = fork();
    if (child == 0) {
        if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0) {
            printf("error: traceme\n");
            fflush(stdout);
            _exit(1);
        }
        printf("pid=%d\n", getpid());
        printf("ready\n");
        fflush(stdout);
        for (volatile unsigned long i = 0;; i++) {}
    }
    for (;;) pause();
}
