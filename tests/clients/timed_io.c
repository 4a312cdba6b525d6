/* Writes (then fsyncs) or reads a file in 1 MiB blocks and prints the
 * seconds it took, from a monotonic clock read around the work alone: the
 * same static binary times the same work on the host and in a container.
 *   timed_io write PATH MIB     timed_io read PATH */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1 << 20)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    static char buf[BLOCK];
    if (argc < 3 || (strcmp(argv[1], "write") && strcmp(argv[1], "read"))) {
        fprintf(stderr, "usage: timed_io write PATH MIB | timed_io read PATH\n");
        return 2;
    }
    int writing = !strcmp(argv[1], "write");
    long blocks = writing && argc > 3 ? atol(argv[3]) : 0;
    double t0 = now();
    int fd = writing ? open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644) : open(argv[2], O_RDONLY);
    if (fd < 0) {
        perror(argv[2]);
        return 1;
    }
    if (writing) {
        memset(buf, 'x', sizeof buf);
        for (long i = 0; i < blocks; i++)
            if (write(fd, buf, BLOCK) != BLOCK) {
                perror("write");
                return 1;
            }
        if (fsync(fd) < 0) {
            perror("fsync");
            return 1;
        }
    } else {
        ssize_t n;
        while ((n = read(fd, buf, BLOCK)) > 0)
            ;
        if (n < 0) {
            perror("read");
            return 1;
        }
    }
    close(fd);
    printf("%.6f\n", now() - t0);
    return 0;
}
