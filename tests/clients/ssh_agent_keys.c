/* Asks the ssh-agent at $SSH_AUTH_SOCK how many keys it holds
 * (SSH2_AGENTC_REQUEST_IDENTITIES) and prints the count. Built static by
 * tests/buildkit.rs and run inside a BuildKit step with
 * `RUN --mount=type=ssh`, where no ssh client exists: it proves the step
 * reached the agent of the client that started the build. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int read_full(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

int main(void) {
    const char *path = getenv("SSH_AUTH_SOCK");
    if (!path || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        fprintf(stderr, "SSH_AUTH_SOCK is not set\n");
        return 2;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("connect to the agent");
        return 3;
    }
    /* length 1, type 11: request identities */
    const unsigned char req[5] = {0, 0, 0, 1, 11};
    if (write(fd, req, sizeof req) != (ssize_t)sizeof req) {
        perror("write");
        return 4;
    }
    unsigned char head[9];
    if (read_full(fd, head, sizeof head) < 0 || head[4] != 12) {
        fprintf(stderr, "no identities answer from the agent\n");
        return 5;
    }
    uint32_t keys = (uint32_t)head[5] << 24 | (uint32_t)head[6] << 16 |
                    (uint32_t)head[7] << 8 | head[8];
    printf("%u\n", keys);
    return 0;
}
