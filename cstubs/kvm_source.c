/*
 * L0 C source for kvmfilter._kvm: the headers, names for kvm_run's anonymous
 * union arms, guards for constants newer than the installed uapi headers, and a
 * few helpers that return -errno instead of setting a thread-local errno.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>
#include <linux/kvm_para.h>
#include <asm/kvm_para.h>

/* KVM ABI: api.rst, KVM_EXIT_HYPERCALL: flags bit 0 = long mode (Linux 6.1+
 * renamed "longmode" to "flags"; older uapi headers lack the define). */
#ifndef KVM_EXIT_HYPERCALL_LONG_MODE
#define KVM_EXIT_HYPERCALL_LONG_MODE (1ULL << 0)
#endif

typedef __typeof__(((struct kvm_run *)0)->hw) kvmf_run_hw;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) kvmf_run_fail_entry;
typedef __typeof__(((struct kvm_run *)0)->ex) kvmf_run_ex;
typedef __typeof__(((struct kvm_run *)0)->io) kvmf_run_io;
typedef __typeof__(((struct kvm_run *)0)->hypercall) kvmf_run_hypercall;
typedef __typeof__(((struct kvm_run *)0)->internal) kvmf_run_internal;
typedef __typeof__(((struct kvm_run *)0)->system_event) kvmf_run_system_event;
typedef __typeof__(((struct kvm_run *)0)->msr) kvmf_run_msr;

/* The first field after hypercall.ret, whatever the headers call it. */
static const size_t KVMF_HYPERCALL_FLAGS_OFFSET =
    offsetof(struct kvm_run, hypercall.ret) + sizeof(__u64);

static void *kvmf_map_failed(void) { return MAP_FAILED; }

static int kvmf_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmf_ioctl_arg(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmf_open(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

static int kvmf_close(int fd)
{
    return close(fd) < 0 ? -errno : 0;
}

static int kvmf_run(int vcpu_fd)
{
    return ioctl(vcpu_fd, KVM_RUN, 0) < 0 ? -errno : 0;
}

static void kvmf_kick_noop(int sig) { (void)sig; }

/* A vCPU thread is kicked out of KVM_RUN with this signal.  The handler does
 * nothing; what matters is that it is installed without SA_RESTART, so the
 * ioctl returns EINTR.  A real-time signal keeps SIGUSR1/2 free for the
 * embedding program. */
static int kvmf_install_kick_handler(void)
{
    struct sigaction sa;
    int sig = SIGRTMIN + 3;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kvmf_kick_noop;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) < 0)
        return -errno;
    return sig;
}
