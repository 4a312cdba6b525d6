/* Opens inotify instances until the kernel refuses one, prints how many it
 * got and why it stopped, then holds them until it is killed: a job's
 * process taking every instance its kernel bound gives it. Built static
 * (gcc -static), so that it runs in a busybox image. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

int main(void)
{
    int n = 0;
    while (n < 1000000 && inotify_init1(IN_CLOEXEC) >= 0)
        n++;
    printf("%d %s\n", n, strerror(errno));
    fflush(stdout);
    for (;;)
        pause();
}
