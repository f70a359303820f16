/* hello-server: a long-running service linked against libhello. Each line a client sends is
 * a name; the reply greets it. The session's is_admin flag sits right after the 32-byte name,
 * so libhello's unchecked copy lets a 33-byte name make anyone an administrator. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int copy_name(char *dst, const char *src, unsigned len);

struct session {
    char name[32];
    int is_admin;
};

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7070;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) {
        perror("hello-server");
        return 1;
    }
    printf("hello-server listening on 127.0.0.1:%d (pid %d)\n", port, getpid());
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        FILE *f = fdopen(c, "r+");
        char line[256];
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\r\n")] = 0;
            struct session sess;
            memset(&sess, 0, sizeof sess);
            if (copy_name(sess.name, line, strlen(line)) < 0)
                fprintf(f, "rejected: name too long\n");
            else
                fprintf(f, "hello %s%s\n", sess.name, sess.is_admin ? " -- welcome, administrator" : "");
            fflush(f);
        }
        fclose(f);
    }
}
