/* Prints the value of get_value() every 5 ms; the test rewrites get_value's r-x text. */
#include <stdio.h>
#include <unistd.h>

__attribute__((noipa)) int get_value(void) { return 41; }

int main(void) {
    printf("pid=%d\n", getpid());
    printf("fn=%p\n", (void *)get_value);
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        printf("value=%d\n", get_value());
        fflush(stdout);
        usleep(5000);
    }
}
