/* SIGTRAP set up as argv[1] says: "handler" (a counting handler), "blocked" (the handler, and
 * SIGTRAP blocked) or "ignored" (SIG_IGN). Each stdin line "report" prints what the SIGTRAP
 * disposition and mask are now and how often the handler ran; the main thread sits in read()
 * in between, where the tracer finds it. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t hits;
static void on_trap(int sig) { (void)sig; hits++; }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "handler";
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = strcmp(mode, "ignored") == 0 ? SIG_IGN : on_trap;
    sigaction(SIGTRAP, &sa, NULL);
    if (strcmp(mode, "blocked") == 0) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGTRAP);
        sigprocmask(SIG_BLOCK, &s, NULL);
    }
    printf("pid=%d\nready\n", getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        struct sigaction now;
        sigaction(SIGTRAP, NULL, &now);
        sigset_t mask;
        sigprocmask(SIG_BLOCK, NULL, &mask);
        const char *disp = now.sa_handler == on_trap  ? "handler"
                           : now.sa_handler == SIG_IGN ? "ignored"
                                                       : "default";
        printf("disposition=%s blocked=%d hits=%d\n", disp, sigismember(&mask, SIGTRAP),
               (int)hits);
        fflush(stdout);
    }
    return 0;
}
