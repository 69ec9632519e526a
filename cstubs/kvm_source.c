/*
 * L0 C source for kvmfilter._kvm: the headers, names for kvm_run's anonymous
 * union arms, guards for constants newer than the installed uapi headers, and a
 * few helpers that return -errno instead of setting a thread-local errno.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
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

/* Newer than some uapi headers still in use (values from Linux 6.x). */
#ifndef KVM_CAP_XSAVE2
#define KVM_CAP_XSAVE2 208
#endif
#ifndef KVM_GET_XSAVE2
#define KVM_GET_XSAVE2 _IOR(KVMIO, 0xcf, struct kvm_xsave)
#endif
#ifndef KVM_CLOCK_REALTIME
#define KVM_CLOCK_REALTIME (1 << 2)
#endif
#ifndef KVM_CLOCK_HOST_TSC
#define KVM_CLOCK_HOST_TSC (1 << 3)
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

/* Every ioctl but KVM_RUN is retried when a signal interrupts it (PEP 475's
 * rule for Python's own calls): a SIGTERM that arrives while KVM_CREATE_VM
 * works must not make it fail.  KVM_RUN's EINTR means "kicked": kvmf_run. */
static int kvmf_ioctl(int fd, unsigned long request, void *arg)
{
    int r;
    do
        r = ioctl(fd, request, arg);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

static int kvmf_ioctl_arg(int fd, unsigned long request, unsigned long arg)
{
    int r;
    do
        r = ioctl(fd, request, arg);
    while (r < 0 && errno == EINTR);
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

/* ---- kicking a vCPU out of KVM_RUN ------------------------------------------
 * A vCPU thread is kicked with a real-time signal (SIGUSR1/2 stay free for the
 * embedding program) whose handler does nothing; it is installed without
 * SA_RESTART, so KVM_RUN returns EINTR.  The kicker also sets immediate_exit,
 * so a kick that lands between two KVM_RUNs is not lost.
 *
 * The signal must interrupt KVM_RUN and nothing else: a vCPU thread also
 * commits to the journal between KVM_RUNs, and a signal there cuts SQLite's
 * busy-wait sleep short (a 10 s busy timeout became about 1 s).  So, as QEMU
 * does without immediate_exit, a vCPU thread keeps the kick signal blocked and
 * KVM_SET_SIGNAL_MASK unblocks it only while the vCPU is in KVM_RUN.  A kick
 * sent at any other time stays pending, and the next KVM_RUN returns EINTR at
 * once; the thread then consumes the pending kicks (kvmf_eat_kicks), or every
 * later KVM_RUN would return EINTR too.
 */
#define KVMF_KICK_SIGNAL (SIGRTMIN + 3)

static void kvmf_kick_noop(int sig) { (void)sig; }

static int kvmf_eat_kicks(void)
{
    sigset_t set;
    struct timespec zero = {0, 0};
    int eaten = 0;
    sigemptyset(&set);
    sigaddset(&set, KVMF_KICK_SIGNAL);
    while (sigtimedwait(&set, NULL, &zero) >= 0)
        eaten++;
    return eaten;
}

static int kvmf_run(int vcpu_fd)
{
    if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
        int err = errno;
        if (err == EINTR)
            kvmf_eat_kicks();
        return -err;
    }
    return 0;
}

static int kvmf_install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kvmf_kick_noop;
    sigemptyset(&sa.sa_mask);
    if (sigaction(KVMF_KICK_SIGNAL, &sa, NULL) < 0)
        return -errno;
    return KVMF_KICK_SIGNAL;
}

/* Run once on a vCPU thread before its first KVM_RUN (see above). */
static int kvmf_vcpu_thread_signals(int vcpu_fd)
{
    sigset_t blocked, during_run;
    /* KVM ABI: api.rst, KVM_SET_SIGNAL_MASK: len is the kernel's sigset size,
     * 8 bytes on x86-64 (the first 64 signals, real-time ones included). */
    unsigned char buffer[sizeof(struct kvm_signal_mask) + 8];
    struct kvm_signal_mask *mask = (struct kvm_signal_mask *)buffer;
    int r = pthread_sigmask(SIG_BLOCK, NULL, &blocked);
    if (r)
        return -r;
    during_run = blocked;
    sigdelset(&during_run, KVMF_KICK_SIGNAL);
    mask->len = 8;
    memcpy(mask->sigset, &during_run, 8);
    if (ioctl(vcpu_fd, KVM_SET_SIGNAL_MASK, mask) < 0)
        return -errno;
    sigaddset(&blocked, KVMF_KICK_SIGNAL);
    r = pthread_sigmask(SIG_SETMASK, &blocked, NULL);
    return r ? -r : 0;
}

/* ---- the MSR fast path ----------------------------------------------------
 * Most accesses to the migration-control MSR are decided by rules the policy
 * (kvmfilter/policy/readiness.py) publishes here (kvmfilter/kvm/fastpath.py):
 * a read returns the value, a write of the current value changes nothing, a
 * write with a reserved bit gets #GP.  kvmf_fast_service applies them without
 * leaving C.
 *
 * A write that changes the value: when a journal must commit it before the
 * vCPU re-enters, it always goes to Python (accept_changes = 0).  Without one,
 * the policy lets C apply it (accept_changes = 1): kvmf_change updates the
 * value and appends a transition record, with a sequence number, to the
 * vCPU's ring, under one small lock so value and sequence stay in step across
 * vCPUs.  Python folds the records into the readiness record in sequence order
 * whenever it reads it (and on a timer in the daemon), so the policy still
 * sees and records every transition - late, not lost: a full ring sends the
 * write to Python, which drains first.  Python's own changes go through
 * kvmf_change too, so there is one order for all of them.
 *
 * Memory ordering (x86-TSO): Python writes the rules with enabled=0 first and
 * enabled=1 last; TSO keeps stores and loads in program order and the acquire
 * loads below keep the compiler from reordering, so a reader that sees
 * enabled=1 sees the rules written before it.  `value` changes only under
 * `lock`; a reader without the lock sees the value just before or just after
 * a concurrent change, which the guest could have seen anyway.  A ring's
 * entries are written before its head is published (release store) and read
 * after the head is read (acquire load); one vCPU thread produces, the policy
 * (under its own lock) consumes.
 *
 * The counts are per vCPU, written only by that vCPU's thread and never reset:
 * Python reads them live.  Aligned 64-bit accesses are atomic on x86-64; the
 * relaxed atomic stores keep the compiler from tearing or caching them.
 */
struct kvmf_msr_fast {
    uint32_t index;          /* the MSR this applies to */
    uint32_t enabled;        /* 0: every access goes to Python */
    uint64_t value;          /* the current value (RDMSR result; no-op writes) */
    uint32_t read_gp;        /* 1: every RDMSR gets #GP */
    uint32_t write_all_gp;   /* 1: every WRMSR gets #GP */
    uint64_t write_gp_mask;  /* WRMSR data & mask != 0: #GP, value unchanged */
    uint32_t accept_changes; /* 1: C applies (and records) value-changing writes */
    uint32_t lock;           /* serializes changes of value and their sequence numbers */
    uint64_t seq;            /* the sequence number of the last change */
};

struct kvmf_transition {
    uint64_t seq;
    uint64_t time_ns;        /* CLOCK_REALTIME */
    uint32_t vcpu;
    uint32_t old_value;
    uint32_t new_value;
    uint32_t pad;
};

struct kvmf_ring {            /* one vCPU's transitions not yet in the record */
    uint32_t vcpu;
    uint32_t capacity;       /* a power of two */
    uint32_t head;           /* written by the producer (the vCPU's thread) */
    uint32_t tail;           /* written by the consumer (the policy) */
    struct kvmf_transition *entries;
};

struct kvmf_fast_counts {
    uint64_t read_ok, read_gp, write_ok, write_gp;
};

/* The console port's OUTs, collected per vCPU for Python to drain in order:
 * a guest prints one byte per exit, and each would otherwise cost a trip
 * through Python.  port > 0xffff collects nothing (the port table gave the
 * console port to another device). */
struct kvmf_console {
    uint32_t port;
    uint32_t capacity;
    uint32_t length;       /* bytes in buffer */
    uint32_t exits;        /* OUT exits collected */
    char *buffer;
};

#define KVMF_COUNT(c) __atomic_store_n(&(c), (c) + 1, __ATOMIC_RELAXED)

/* -1: Python must decide.  0: ok (for a read, *out = the value).  1: #GP.
 * 2: a write that changes the value, which C may apply (*out = the new value). */
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
    if (data == __atomic_load_n(&f->value, __ATOMIC_ACQUIRE))
        return 0;
    if (!__atomic_load_n(&f->accept_changes, __ATOMIC_ACQUIRE))
        return -1;
    *out = data;
    return 2;
}

/* Set the value to `data` and record the change in `ring` (at `time_ns`, or
 * now when 0): 1 changed, 0 it already was `data`, -1 the ring is full
 * (nothing changed; drain it first). */
static int kvmf_change(struct kvmf_msr_fast *f, struct kvmf_ring *ring, uint64_t data,
                       uint64_t time_ns)
{
    int changed = 0;
    while (__atomic_exchange_n(&f->lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&f->lock, __ATOMIC_RELAXED))
            __builtin_ia32_pause();
    uint64_t old = f->value;
    if (old != data) {
        uint32_t head = ring->head;
        if (head - __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE) >= ring->capacity) {
            changed = -1;
        } else {
            struct kvmf_transition *t = &ring->entries[head & (ring->capacity - 1)];
            if (!time_ns) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                time_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
            }
            t->seq = ++f->seq;
            t->time_ns = time_ns;
            t->vcpu = ring->vcpu;
            t->old_value = (uint32_t)old;
            t->new_value = (uint32_t)data;
            __atomic_store_n(&f->value, data, __ATOMIC_RELEASE);
            __atomic_store_n(&ring->head, head + 1, __ATOMIC_RELEASE);
            changed = 1;
        }
    }
    __atomic_store_n(&f->lock, 0, __ATOMIC_RELEASE);
    return changed;
}

/* Take up to `max` recorded transitions from the rings into `out`, in sequence
 * order, starting after *last_seq (updated).  A record is taken only when every
 * one before it has been: a vCPU's record appears in its ring under the same
 * lock that gave it its number, so there are no gaps to wait for. */
static int kvmf_drain(struct kvmf_ring **rings, int nrings, uint64_t *last_seq,
                      struct kvmf_transition *out, int max)
{
    int count = 0;
    while (count < max) {
        uint64_t want = *last_seq + 1;
        int found = 0;
        for (int i = 0; i < nrings && !found; i++) {
            struct kvmf_ring *r = rings[i];
            uint32_t tail = r->tail;
            if (tail == __atomic_load_n(&r->head, __ATOMIC_ACQUIRE))
                continue;
            struct kvmf_transition *e = &r->entries[tail & (r->capacity - 1)];
            if (e->seq != want)
                continue;
            out[count++] = *e;
            __atomic_store_n(&r->tail, tail + 1, __ATOMIC_RELEASE);
            *last_seq = want;
            found = 1;
        }
        if (!found)
            break;
    }
    return count;
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

/* Service the exit in `run` if the rules cover it: 1 = done (the reply is in
 * the run page; re-enter), 0 = Python must handle it.  The replies follow the
 * same rules as kvmfilter.kvm.exits.apply: the two are tested against each
 * other on hand-filled run pages. */
static int kvmf_fast_service(struct kvm_run *run, struct kvmf_msr_fast *f,
                             struct kvmf_fast_counts *counts, struct kvmf_console *con,
                             struct kvmf_ring *ring)
{
    uint32_t reason = run->exit_reason;
    if (reason == KVM_EXIT_IO)
        return kvmf_console_out(run, con);
    if ((reason != KVM_EXIT_X86_WRMSR && reason != KVM_EXIT_X86_RDMSR)
        || run->msr.index != f->index)
        return 0;
    int is_write = reason == KVM_EXIT_X86_WRMSR;
    uint64_t value = 0;
    int verdict = kvmf_fast_decide(f, is_write, run->msr.data, &value);
    if (verdict < 0 || (verdict == 2 && (ring == NULL || kvmf_change(f, ring, value, 0) < 0)))
        return 0;
    if (verdict == 2)
        verdict = 0;
    /* KVM ABI: api.rst, KVM_EXIT_X86_RDMSR/WRMSR: error=1 injects #GP; for
     * RDMSR, data is what the guest reads. */
    run->msr.error = (uint8_t)verdict;
    if (!is_write && !verdict)
        run->msr.data = value;
    if (is_write) {
        if (verdict) KVMF_COUNT(counts->write_gp); else KVMF_COUNT(counts->write_ok);
    } else {
        if (verdict) KVMF_COUNT(counts->read_gp); else KVMF_COUNT(counts->read_ok);
    }
    return 1;
}

/* KVM_RUN until an exit Python must see (returns 0), `budget` fast exits have
 * been serviced (returns 1, so Python can drain the console), or KVM_RUN
 * fails (-errno; EINTR when kicked, pending kicks consumed).  The GIL is
 * released for all of it. */
static int kvmf_run_fast(int vcpu_fd, struct kvm_run *run, struct kvmf_msr_fast *f,
                         struct kvmf_fast_counts *counts, struct kvmf_console *con,
                         struct kvmf_ring *ring, uint32_t budget)
{
    while (budget--) {
        int r = kvmf_run(vcpu_fd);
        if (r < 0)
            return r;
        if (!kvmf_fast_service(run, f, counts, con, ring))
            return 0;
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

/* ---- CRC-32C ---------------------------------------------------------------
 * The migration stream's checksum (format version 2): CRC-32C, Castagnoli's
 * polynomial (reflected 0x82F63B78; iSCSI's and ext4's), with the usual
 * pre- and post-inversion.  SSE4.2's CRC32 instruction takes 8 bytes at a
 * time - about 3x zlib's CRC-32, which cost a quarter of the CPU a migration
 * spends per page; CPUs without it take the bitwise loop. */
static uint32_t kvmf_crc32c_portable(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t kvmf_crc32c_sse42(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = (uint32_t)~crc;
    for (; n && ((uintptr_t)p & 7); n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
    }
    for (; n; n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

static uint32_t kvmf_crc32c(uint32_t crc, const unsigned char *p, size_t n)
{
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2"))
        return kvmf_crc32c_sse42(crc, p, n);
#endif
    return kvmf_crc32c_portable(crc, p, n);
}

/* ---- page bitmaps -----------------------------------------------------------
 * KVM's dirty-log layout: bit i of the little-endian byte string is page i
 * (x86: a word load is the same bits).  A 64 GiB guest's bitmap is 2 MiB;
 * these walk it a word at a time, where Python cost 1.5 ms per operation. */
static uint64_t kvmf_bm_word(const unsigned char *b, size_t nbytes, size_t w)
{
    uint64_t v = 0;
    size_t off = w * 8;
    if (off + 8 <= nbytes)
        memcpy(&v, b + off, 8);
    else if (off < nbytes)
        memcpy(&v, b + off, nbytes - off);  /* a partial last word: zero-padded */
    return v;
}

/* dst |= src over n bytes. */
static void kvmf_bitmap_or(unsigned char *dst, const unsigned char *src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, dst + i, 8);
        memcpy(&b, src + i, 8);
        a |= b;
        memcpy(dst + i, &a, 8);
    }
    for (; i < n; i++)
        dst[i] |= src[i];
}

/* Set bits in n bytes. */
static uint64_t kvmf_bitmap_count(const unsigned char *b, size_t n)
{
    uint64_t count = 0;
    for (size_t w = 0; w < (n + 7) / 8; w++)
        count += (uint64_t)__builtin_popcountll(kvmf_bm_word(b, n, w));
    return count;
}

/* Runs of set bits from bit *pos on, as (first, length) pairs into out, at
 * most max of them; returns how many, and *pos where the next call goes on
 * (n * 8 when the bitmap is done).  Runs are never split across calls. */
static size_t kvmf_bitmap_runs(const unsigned char *b, size_t n, uint64_t *pos,
                               uint64_t *out, size_t max)
{
    size_t nwords = (n + 7) / 8, count = 0;
    uint64_t i = *pos;
    while (count < max) {
        size_t w = (size_t)(i / 64);
        if (w >= nwords) {
            i = (uint64_t)n * 8;
            break;
        }
        uint64_t word = kvmf_bm_word(b, n, w) & (~0ULL << (i % 64));
        while (!word && ++w < nwords)
            word = kvmf_bm_word(b, n, w);
        if (!word) {
            i = (uint64_t)n * 8;
            break;
        }
        uint64_t start = (uint64_t)w * 64 + (uint64_t)__builtin_ctzll(word);
        word = ~kvmf_bm_word(b, n, w) & (~0ULL << (start % 64));
        while (!word && ++w < nwords)
            word = ~kvmf_bm_word(b, n, w);
        uint64_t end = word ? (uint64_t)w * 64 + (uint64_t)__builtin_ctzll(word)
                            : (uint64_t)nwords * 64;
        out[2 * count] = start;
        out[2 * count + 1] = end - start;
        count++;
        i = end;
    }
    *pos = i;
    return count;
}
