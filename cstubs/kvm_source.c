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
#include <time.h>
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

/* ---- the MSR fast path ----------------------------------------------------
 * Most accesses to the migration-control MSR change nothing: a read, a write
 * of the current value, a write the policy rejects whatever the value.  The
 * policy (Python, kvmfilter/migration.py) publishes those verdicts here as
 * rules; this loop applies them without leaving C, and returns to Python for
 * everything else - above all for every write that would change the value, so
 * the policy alone decides transitions and the journal commits them before
 * the vCPU re-enters.  `value` and `enabled` are shared by all vCPUs of a VM
 * and written by Python under the policy's lock; the counts are per vCPU and
 * drained by that vCPU's thread.
 */
struct kvmf_msr_fast {
    uint32_t index;          /* the MSR this applies to */
    uint32_t enabled;        /* 0: every access goes to Python */
    uint64_t value;          /* the current value (RDMSR result; no-op writes) */
    uint32_t read_gp;        /* 1: every RDMSR gets #GP */
    uint32_t write_all_gp;   /* 1: every WRMSR gets #GP */
    uint64_t write_gp_mask;  /* WRMSR data & mask != 0: #GP, value unchanged */
};

struct kvmf_fast_counts {
    uint64_t read_ok, read_gp, write_ok, write_gp;
};

/* The console port's OUTs, collected per vCPU for Python to drain in order:
 * a guest prints one byte per exit, and each would otherwise cost a trip
 * through Python. */
struct kvmf_console {
    uint32_t port;
    uint32_t capacity;
    uint32_t length;       /* bytes in buffer */
    uint32_t exits;        /* OUT exits collected */
    char *buffer;
};

/* -1: Python must decide.  0: ok (for a read, *out = the value).  1: #GP. */
static int kvmf_fast_decide(struct kvmf_msr_fast *f, int is_write, uint64_t data,
                            uint64_t *out)
{
    if (!__atomic_load_n(&f->enabled, __ATOMIC_ACQUIRE))
        return -1;
    if (!is_write) {
        if (f->read_gp)
            return 1;
        *out = __atomic_load_n(&f->value, __ATOMIC_ACQUIRE);
        return 0;
    }
    if (f->write_all_gp || (data & f->write_gp_mask))
        return 1;
    return data == __atomic_load_n(&f->value, __ATOMIC_ACQUIRE) ? 0 : -1;
}

/* Collect a console OUT; 0 if it is not one or does not fit (Python takes it). */
static int kvmf_console_out(struct kvm_run *run, struct kvmf_console *con)
{
    if (con == NULL || run->io.direction != KVM_EXIT_IO_OUT || run->io.port != con->port)
        return 0;
    uint32_t n = (uint32_t)run->io.size * run->io.count;
    if (n > con->capacity - con->length)
        return 0;
    memcpy(con->buffer + con->length, (char *)run + run->io.data_offset, n);
    con->length += n;
    con->exits++;
    return 1;
}

/* KVM_RUN until an exit Python must see (returns 0), `budget` fast exits have
 * been serviced (returns 1, so Python can drain the counts), or KVM_RUN fails
 * (-errno; EINTR when kicked).  The GIL is released for all of it. */
static int kvmf_run_fast(int vcpu_fd, struct kvm_run *run, struct kvmf_msr_fast *f,
                         struct kvmf_fast_counts *counts, struct kvmf_console *con,
                         uint32_t budget)
{
    while (budget--) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        uint32_t reason = run->exit_reason;
        if (reason == KVM_EXIT_IO) {
            if (kvmf_console_out(run, con))
                continue;
            return 0;
        }
        if ((reason != KVM_EXIT_X86_WRMSR && reason != KVM_EXIT_X86_RDMSR)
            || run->msr.index != f->index)
            return 0;
        int is_write = reason == KVM_EXIT_X86_WRMSR;
        uint64_t value = 0;
        int verdict = kvmf_fast_decide(f, is_write, run->msr.data, &value);
        if (verdict < 0)
            return 0;
        /* KVM ABI: api.rst, KVM_EXIT_X86_RDMSR/WRMSR: error=1 injects #GP. */
        run->msr.error = (uint8_t)verdict;
        if (!is_write && !verdict)
            run->msr.data = value;
        if (is_write)
            verdict ? counts->write_gp++ : counts->write_ok++;
        else
            verdict ? counts->read_gp++ : counts->read_ok++;
    }
    return 1;
}

/* ---- benchmark baseline ---------------------------------------------------
 * The minimal C service loop `kvmfilter bench` compares against: accept every
 * WRMSR of `index`, answer every RDMSR with 1, stop at the first OUT to port
 * 0xF4.  Returns the number of MSR exits serviced, or -errno. */
static long kvmf_bench_c_loop(int vcpu_fd, struct kvm_run *run, uint32_t index)
{
    long exits = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        switch (run->exit_reason) {
        case KVM_EXIT_X86_WRMSR:
        case KVM_EXIT_X86_RDMSR:
            if (run->msr.index != index)
                return -EPROTO;
            run->msr.error = 0;
            if (run->exit_reason == KVM_EXIT_X86_RDMSR)
                run->msr.data = 1;
            exits++;
            break;
        case KVM_EXIT_IO:
            if (run->io.port == 0xf4)
                return exits;
            break;
        default:
            return -EPROTO;
        }
    }
}

static double kvmf_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
