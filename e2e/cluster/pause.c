/* The pod sandbox's process (containerd's sandbox_image): holds the pod's
 * namespaces, reaps zombies as PID 1, exits on SIGINT/SIGTERM. Kubernetes'
 * own pause does the same. Built static: gcc -static -O2 -s -o pause pause.c */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { _exit(0); }

static void reap(int sig) {
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    /* PID 1 ignores signals it has no handler for, so install them. */
    struct sigaction term = {.sa_handler = quit}, chld = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &term, NULL) < 0 || sigaction(SIGTERM, &term, NULL) < 0 ||
        sigaction(SIGCHLD, &chld, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) pause();
}
