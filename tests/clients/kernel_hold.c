/* Takes what the kernel bounds per user until it refuses one more, prints
 * how many it got and why it stopped, then holds them until it is killed:
 * a job's process taking all its bound gives it.
 *
 *   kernel_hold inotify   inotify instances (fs.inotify.max_user_instances)
 *   kernel_hold keys      keys in the session keyring (kernel.keys.maxkeys,
 *                         kernel.keys.maxbytes)
 *
 * Built static (gcc -static), so that it runs in a busybox image. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/syscall.h>
#include <unistd.h>

/* <linux/keyctl.h>: the calling process's session keyring. */
#define KEY_SPEC_SESSION_KEYRING -3

static int take_key(int n)
{
    char desc[32];
    snprintf(desc, sizeof desc, "hold-%d", n);
    /* No libkeyutils in a static build: add_key(2) itself. */
    return syscall(SYS_add_key, "user", desc, "x", 1, KEY_SPEC_SESSION_KEYRING) >= 0;
}

int main(int argc, char **argv)
{
    int keys = argc > 1 && strcmp(argv[1], "keys") == 0;
    if (argc < 2 || (!keys && strcmp(argv[1], "inotify") != 0)) {
        fprintf(stderr, "usage: kernel_hold inotify|keys\n");
        return 2;
    }
    int n = 0;
    while (n < 1000000 && (keys ? take_key(n) : inotify_init1(IN_CLOEXEC) >= 0))
        n++;
    printf("%d %s\n", n, strerror(errno));
    fflush(stdout);
    for (;;)
        pause();
}
