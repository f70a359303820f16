/* Forks a child that exits at once and is never reaped: a zombie. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    pid_t child = fork();
    if (child == 0) _exit(0);
    printf("pid=%d\n", child);
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
