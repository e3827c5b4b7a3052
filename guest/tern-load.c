/*
 * tern-load: the guest workload that tern migrates and checks.
 *
 * It runs as the only program in a tiny initramfs guest and does three things
 * in ONE thread (the guest may have a single vCPU, and a single thread keeps
 * the behaviour deterministic and the code obvious):
 *
 *   1. dirties memory at a controlled rate: each write bumps a page's
 *      generation and rewrites the page's pattern, so the migration has a
 *      known, steady dirty rate to converge against;
 *   2. verifies every page continuously against a shadow array of expected
 *      generations kept in a separate allocation, so a page that arrives
 *      stale or torn on the destination is reported (CORRUPT ...); the writer
 *      also checks a page's header before overwriting it, so a stale page is
 *      reported even when the writer reaches it before the verifier;
 *   3. prints a heartbeat every 10 ms, so the host can measure the blackout
 *      (host-side arrival gap) and check that the sequence is continuous.
 *
 * Control state is checked too: twin counters, one on the stack and one in
 * .bss, must always agree. QEMU 7.2 + TCG lost dirty *stack* pages during
 * migration; the data-page checker alone did not see it, these counters did.
 *
 * Protocol (see docs/CONVENTIONS.md, "Guest serial protocol"): every line is
 * emitted with a single write(2) so lines are never interleaved or split by us.
 *
 * Parameters come from the kernel command line (/proc/cmdline). They use
 * underscores because the kernel treats dotted parameters as module options
 * and does not pass them to init.
 *   tern_ws_mib=N        working set in MiB (default 64)
 *   tern_rate=N|max      page writes per second (default max)
 *   tern_pattern=seq|random|bursty   which page to write next (default seq);
 *                        bursty writes sequentially at tern_rate for 2 s, then
 *                        nothing for 2 s, and again: a dirty rate that swings
 *                        between passes, which a policy must not mistake for
 *                        convergence (or for a stall)
 *   tern_verify=1|0      run the verifier (default 1)
 *   tern_disk=/dev/vdX   data-disk mode (default off): also write generation-
 *                        stamped 4 KiB blocks to this block device and verify them
 *                        continuously, like pages (see "Data disk" below)
 *   tern_disk_rate=N|max block writes per second (default 100)
 *   tern_disk_verify_rate=N  block reads per second by the disk verifier
 *                        (default 1000: a 16 MiB disk is verified every 4 s)
 *   tern_ip=A.B.C.D/N    network mode (default off): /init gives eth0 this address;
 *                        tern-load then echoes every UDP datagram it receives on
 *                        tern_udp_port back to its sender (see "Network" below)
 *   tern_udp_port=N      UDP port of the echo service (default 7777)
 *   tern_inject=stale    self-test: 2 s after READY, roll one page back to its
 *                        previous generation and the stack counter back by one,
 *                        exactly what a lost dirty page does, so tests can prove
 *                        that CORRUPT and CTLMISMATCH really fire (default off)
 *
 * Data disk: every block holds (index, generation) and mixed stamp words, as a
 * page does; the expected generations live in RAM. A block that reads back with
 * another generation than expected (a write the storage migration lost, or an old
 * copy on the destination) is printed as CORRUPT block=... The disk is opened
 * with O_DIRECT so reads come from the device, not from the guest's page cache
 * (which migrates with RAM and would hide a stale disk). Every block is stamped
 * with generation 0 before READY; the writer checks a block's header before
 * overwriting it; the verifier sweeps the whole disk in passes (DISKSTATUS
 * passes=), so a full verification on the destination is "passes grew by 2".
 *
 * Network: a client outside the guest sends numbered datagrams every few ms and
 * timestamps the echoes; the longest gap between echoes is the blackout a user
 * of the VM sees (which the serial heartbeat cannot show: it does not cross the
 * guest's network). The socket is polled once per millisecond from the main
 * loop, so the echo adds at most ~1 ms and needs no second thread.
 *
 * Build: gcc -static -O2 -o tern-load tern-load.c
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / 8u)
/* Pattern words are placed every 512 bytes plus the very last word, so a page
 * that is only partly up to date (torn) is caught as well as a stale one. */
#define PATTERN_STRIDE_WORDS 64u
#define SLICE_NS 10000000ull      /* rate budget and heartbeat period: 10 ms */
#define STATUS_NS 1000000000ull   /* STATUS period: 1 s */
#define BURST_ON_NS 2000000000ull  /* tern_pattern=bursty: writing for 2 s ... */
#define BURST_OFF_NS 2000000000ull /* ... then idle for 2 s */
#define MAX_CATCHUP_SLICES 10u    /* rate budget made up after a short stall: 100 ms */
/* Work per loop iteration is bounded so the loop comes back to the clock often
 * enough to keep heartbeats on time even at max rate on a slow (TCG) vCPU. */
#define WRITE_BATCH 32u
#define VERIFY_BATCH 32u

/* The .bss twin of the stack control counter. volatile: every increment must
 * really go to memory, which is what a migration has to carry over. */
static volatile uint64_t ctl_bss;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* One line, one write(2): the host's serial reader timestamps lines on
 * arrival, and a single write keeps each line contiguous on the console. */
static void emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emit(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    const char *p = line;
    while (n > 0) {
        ssize_t w = write(1, p, (size_t)n);
        if (w <= 0)
            return; /* console gone: nothing sensible left to do */
        p += w;
        n -= (int)w;
    }
}

/* splitmix64 finaliser: a cheap, well-mixed function of (page, generation,
 * slot), so a word from another page or another generation never matches. */
static uint64_t mix(uint64_t page, uint64_t gen, uint64_t slot)
{
    uint64_t z = page * 0x9E3779B97F4A7C15ull ^ (gen + 1) * 0xBF58476D1CE4E5B9ull ^
                 (slot + 1) * 0x94D049BB133111EBull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Page layout: word 0 = page index, word 1 = generation (the header, which
 * lets the verifier say which generation it found), then a mixed word every
 * PATTERN_STRIDE_WORDS words and in the last word of the page. */
static void fill_page(uint64_t *page, uint64_t index, uint64_t gen)
{
    page[0] = index;
    page[1] = gen;
    for (uint64_t w = PATTERN_STRIDE_WORDS; w < WORDS_PER_PAGE; w += PATTERN_STRIDE_WORDS)
        page[w] = mix(index, gen, w);
    page[WORDS_PER_PAGE - 1] = mix(index, gen, WORDS_PER_PAGE - 1);
}

static int page_matches(const uint64_t *page, uint64_t index, uint64_t gen)
{
    if (page[0] != index || page[1] != gen)
        return 0;
    for (uint64_t w = PATTERN_STRIDE_WORDS; w < WORDS_PER_PAGE; w += PATTERN_STRIDE_WORDS)
        if (page[w] != mix(index, gen, w))
            return 0;
    return page[WORDS_PER_PAGE - 1] == mix(index, gen, WORDS_PER_PAGE - 1);
}

struct params {
    uint64_t udp_port; /* 0: no network service */
    const char *disk; /* NULL: no data disk */
    uint64_t disk_rate; /* block writes per second; 0 = max */
    uint64_t disk_verify_rate; /* block reads per second */
    uint64_t ws_mib;
    uint64_t rate; /* page writes per second; 0 = max */
    int random;
    int bursty;
    int verify;
    int inject_stale;
};

/* Returns 0 on success; on a bad value prints an ERROR line naming it. */
static int parse_params(struct params *p)
{
    p->ws_mib = 64;
    p->rate = 0;
    p->random = 0;
    p->bursty = 0;
    p->verify = 1;
    p->inject_stale = 0;
    p->udp_port = 0;
    int want_net = 0;
    uint64_t port = 7777;
    p->disk = NULL;
    p->disk_rate = 100;
    p->disk_verify_rate = 1000;

    static char buf[4096]; /* static: p->disk points into it */
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f)
        return 0; /* no /proc: run with the defaults */
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';

    for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok;
         tok = strtok_r(NULL, " \t\n", &save)) {
        char *end;
        if (strncmp(tok, "tern_ws_mib=", 12) == 0) {
            p->ws_mib = strtoull(tok + 12, &end, 10);
            if (*end || p->ws_mib == 0 || p->ws_mib > (1u << 20)) {
                emit("ERROR bad %s: expected a size in MiB, 1..1048576", tok);
                return -1;
            }
        } else if (strncmp(tok, "tern_rate=", 10) == 0) {
            if (strcmp(tok + 10, "max") == 0) {
                p->rate = 0;
            } else {
                p->rate = strtoull(tok + 10, &end, 10);
                if (*end || p->rate == 0) {
                    emit("ERROR bad %s: expected page writes per second (>0) or max", tok);
                    return -1;
                }
            }
        } else if (strncmp(tok, "tern_pattern=", 13) == 0) {
            if (strcmp(tok + 13, "seq") == 0) {
                p->random = 0;
            } else if (strcmp(tok + 13, "random") == 0) {
                p->random = 1;
            } else if (strcmp(tok + 13, "bursty") == 0) {
                p->bursty = 1;
            } else {
                emit("ERROR bad %s: expected seq, random or bursty", tok);
                return -1;
            }
        } else if (strncmp(tok, "tern_inject=", 12) == 0) {
            if (strcmp(tok + 12, "stale") != 0) {
                emit("ERROR bad %s: expected tern_inject=stale", tok);
                return -1;
            }
            p->inject_stale = 1;
        } else if (strncmp(tok, "tern_ip=", 8) == 0) {
            want_net = 1; /* /init configured eth0 from it */
        } else if (strncmp(tok, "tern_udp_port=", 14) == 0) {
            port = strtoull(tok + 14, &end, 10);
            if (*end || port == 0 || port > 65535) {
                emit("ERROR bad %s: expected a UDP port, 1..65535", tok);
                return -1;
            }
        } else if (strncmp(tok, "tern_disk=", 10) == 0) {
            if (strncmp(tok + 10, "/dev/", 5) != 0) {
                emit("ERROR bad %s: expected a block device such as /dev/vda", tok);
                return -1;
            }
            p->disk = tok + 10;
        } else if (strncmp(tok, "tern_disk_rate=", 15) == 0) {
            if (strcmp(tok + 15, "max") == 0) {
                p->disk_rate = 0;
            } else {
                p->disk_rate = strtoull(tok + 15, &end, 10);
                if (*end || p->disk_rate == 0) {
                    emit("ERROR bad %s: expected block writes per second (>0) or max", tok);
                    return -1;
                }
            }
        } else if (strncmp(tok, "tern_disk_verify_rate=", 22) == 0) {
            p->disk_verify_rate = strtoull(tok + 22, &end, 10);
            if (*end || p->disk_verify_rate == 0) {
                emit("ERROR bad %s: expected block reads per second (>0)", tok);
                return -1;
            }
        } else if (strncmp(tok, "tern_verify=", 12) == 0) {
            if (strcmp(tok + 12, "1") == 0) {
                p->verify = 1;
            } else if (strcmp(tok + 12, "0") == 0) {
                p->verify = 0;
            } else {
                emit("ERROR bad %s: expected 1 or 0", tok);
                return -1;
            }
        }
    }
    if (want_net)
        p->udp_port = port;
    return 0;
}

static void *map_or_die(size_t bytes, const char *what)
{
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        emit("ERROR cannot allocate %zu bytes for %s (give the guest more memory)", bytes, what);
        exit(3);
    }
    return m;
}


/* ---- Data disk ------------------------------------------------------------ */

#define DISK_BLOCK 4096u
#define DISK_TAG (1ull << 62) /* block indices never collide with page indices */
#define DISK_INIT_CHUNK 64u   /* blocks per write while stamping generation 0 */
#define DISK_BATCH 4u         /* at most this many writes (and reads) per loop */
#define DISK_OPEN_TRIES 100u  /* 10 s for the virtio-blk probe to create the node */

struct disk {
    int fd;
    uint64_t blocks;
    uint64_t *expected;
    uint64_t *buf; /* one block, page-aligned for O_DIRECT */
    uint64_t write_cursor, verify_cursor;
    uint64_t writes, writes_at_last_status, passes, corrupt, ioerr;
    uint64_t writes_due_base, writes_done, reads_done; /* rate accounting */
};

static int disk_read(struct disk *d, uint64_t i)
{
    ssize_t n = pread(d->fd, d->buf, DISK_BLOCK, (off_t)(i * DISK_BLOCK));
    if (n != (ssize_t)DISK_BLOCK) {
        d->ioerr++;
        emit("DISKERR op=read block=%llu errno=%d", (unsigned long long)i, n < 0 ? errno : 0);
        return -1;
    }
    return 0;
}

static int disk_write(struct disk *d, uint64_t i, uint64_t gen)
{
    fill_page(d->buf, i | DISK_TAG, gen);
    ssize_t n = pwrite(d->fd, d->buf, DISK_BLOCK, (off_t)(i * DISK_BLOCK));
    if (n != (ssize_t)DISK_BLOCK) {
        d->ioerr++;
        emit("DISKERR op=write block=%llu errno=%d", (unsigned long long)i, n < 0 ? errno : 0);
        return -1;
    }
    return 0;
}

static void disk_report_corrupt(struct disk *d, uint64_t i)
{
    d->corrupt++;
    emit("CORRUPT block=%llu expected=%llu found=%llu", (unsigned long long)i,
         (unsigned long long)d->expected[i], (unsigned long long)d->buf[1]);
}

/* Opens the device (waiting for the driver's probe), sizes it and stamps every
 * block with generation 0. Exits with an ERROR line if the disk is unusable. */
static void disk_open(struct disk *d, const char *path)
{
    memset(d, 0, sizeof *d);
    for (unsigned t = 0;; t++) {
        d->fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
        if (d->fd >= 0)
            break;
        if (t == DISK_OPEN_TRIES) {
            emit("ERROR cannot open %s: %s (is the disk attached and virtio_blk loaded?)", path,
                 strerror(errno));
            exit(4);
        }
        usleep(100000);
    }
    uint64_t bytes = 0;
    if (ioctl(d->fd, BLKGETSIZE64, &bytes) != 0 || bytes < DISK_BLOCK) {
        emit("ERROR %s: cannot size it or smaller than one 4 KiB block", path);
        exit(4);
    }
    d->blocks = bytes / DISK_BLOCK;
    d->expected = map_or_die(d->blocks * sizeof(uint64_t), "the disk's shadow generations");
    d->buf = map_or_die(DISK_BLOCK * DISK_INIT_CHUNK, "the disk buffer");
    for (uint64_t i = 0; i < d->blocks; i += DISK_INIT_CHUNK) {
        uint64_t n = d->blocks - i < DISK_INIT_CHUNK ? d->blocks - i : DISK_INIT_CHUNK;
        for (uint64_t k = 0; k < n; k++)
            fill_page(d->buf + k * (DISK_BLOCK / 8), (i + k) | DISK_TAG, 0);
        ssize_t w = pwrite(d->fd, d->buf, n * DISK_BLOCK, (off_t)(i * DISK_BLOCK));
        if (w != (ssize_t)(n * DISK_BLOCK)) {
            emit("ERROR %s: writing blocks %llu..%llu failed: %s", path, (unsigned long long)i,
                 (unsigned long long)(i + n), w < 0 ? strerror(errno) : "short write");
            exit(4);
        }
        for (uint64_t k = 0; k < n; k++)
            d->expected[i + k] = 0;
    }
    d->verify_cursor = d->blocks / 2;
}

/* Budget for `rate` operations per second since `start`, minus those done; a
 * backlog after a stall is capped at 100 ms worth, like the page writer's. */
static uint64_t disk_budget(uint64_t rate, uint64_t start, uint64_t now, uint64_t *done)
{
    if (rate == 0)
        return DISK_BATCH;
    uint64_t due = (now - start) / 1000 * rate / 1000000;
    uint64_t cap = rate / 10 + 1;
    if (due > *done + cap)
        *done = due - cap;
    uint64_t n = due - *done;
    return n < DISK_BATCH ? n : DISK_BATCH;
}

/* One loop iteration's disk work: a few writes (each checked before it
 * overwrites), then a few verifying reads. */
static void disk_step(struct disk *d, const struct params *prm, uint64_t start, uint64_t now)
{
    uint64_t nw = disk_budget(prm->disk_rate, start, now, &d->writes_done);
    for (uint64_t k = 0; k < nw; k++) {
        uint64_t i = d->write_cursor;
        d->write_cursor = i + 1 == d->blocks ? 0 : i + 1;
        if (disk_read(d, i) == 0 && (d->buf[0] != (i | DISK_TAG) || d->buf[1] != d->expected[i]))
            disk_report_corrupt(d, i);
        if (disk_write(d, i, d->expected[i] + 1) == 0) {
            d->expected[i]++;
            d->writes++;
        }
        d->writes_done++;
    }
    uint64_t nr = disk_budget(prm->disk_verify_rate, start, now, &d->reads_done);
    for (uint64_t k = 0; k < nr; k++) {
        uint64_t i = d->verify_cursor;
        if (disk_read(d, i) == 0 && !page_matches(d->buf, i | DISK_TAG, d->expected[i])) {
            disk_report_corrupt(d, i);
            disk_write(d, i, d->expected[i]); /* resync: one fault is reported once */
        }
        d->reads_done++;
        if (++d->verify_cursor == d->blocks) {
            d->verify_cursor = 0;
            d->passes++;
        }
    }
}

/* ---- Network echo service ------------------------------------------------- */

#define NET_POLL_NS 1000000ull /* poll the socket every 1 ms */
#define NET_BATCH 8u           /* datagrams answered per poll at most */

struct net {
    int fd;
    uint64_t rx, tx, next_poll;
};

static void net_open(struct net *n, uint64_t port)
{
    memset(n, 0, sizeof *n);
    n->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (n->fd < 0 || bind(n->fd, (struct sockaddr *)&a, sizeof a) != 0) {
        emit("ERROR cannot open UDP port %llu: %s", (unsigned long long)port, strerror(errno));
        exit(5);
    }
}

/* Echo what arrived since the last poll back to its senders. */
static void net_step(struct net *n, uint64_t now)
{
    if (now < n->next_poll)
        return;
    n->next_poll = now + NET_POLL_NS;
    for (unsigned k = 0; k < NET_BATCH; k++) {
        char buf[512];
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t got = recvfrom(n->fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (got < 0)
            return; /* EAGAIN: nothing more */
        n->rx++;
        if (sendto(n->fd, buf, (size_t)got, 0, (struct sockaddr *)&from, len) == got)
            n->tx++;
    }
}

int main(void)
{
    struct params prm;
    if (parse_params(&prm) != 0)
        return 2;

    const uint64_t pages = prm.ws_mib * (1024 * 1024 / PAGE_SIZE);
    uint8_t *ws = map_or_die(pages * PAGE_SIZE, "the working set");
    /* Expected generations live in their own mapping, away from the pages
     * they describe, so one stale region cannot corrupt both consistently. */
    uint64_t *expected = map_or_die(pages * sizeof(uint64_t), "the shadow generations");

    /* Touch every page (generation 0) so the whole working set is resident
     * and part of the migration from the start. */
    for (uint64_t i = 0; i < pages; i++) {
        fill_page((uint64_t *)(ws + i * PAGE_SIZE), i, 0);
        expected[i] = 0;
    }

    static struct disk disk;
    if (prm.disk)
        disk_open(&disk, prm.disk);
    static struct net net;
    if (prm.udp_port)
        net_open(&net, prm.udp_port);

    char rate_str[32];
    if (prm.rate)
        snprintf(rate_str, sizeof rate_str, "%llu", (unsigned long long)prm.rate);
    else
        snprintf(rate_str, sizeof rate_str, "max");
    emit("READY ws_mib=%llu rate=%s pattern=%s pages=%llu", (unsigned long long)prm.ws_mib,
         rate_str, prm.random ? "random" : prm.bursty ? "bursty" : "seq", (unsigned long long)pages);
    if (prm.disk) {
        char disk_rate[32];
        if (prm.disk_rate)
            snprintf(disk_rate, sizeof disk_rate, "%llu", (unsigned long long)prm.disk_rate);
        else
            snprintf(disk_rate, sizeof disk_rate, "max");
        emit("DISKREADY dev=%s blocks=%llu rate=%s verify_rate=%llu", prm.disk,
             (unsigned long long)disk.blocks, disk_rate,
             (unsigned long long)prm.disk_verify_rate);
    }
    if (prm.udp_port)
        emit("NETREADY port=%llu", (unsigned long long)prm.udp_port);

    /* The stack twin of ctl_bss. volatile forces it into the stack frame
     * instead of a register, so a stale stack page shows up as a mismatch. */
    volatile uint64_t ctl_stack = 0;
    ctl_bss = 0;

    /* The heartbeat sequence is kept in the stack frame too (volatile), so a stale
     * stack page after a migration also shows as a sequence going backwards. */
    volatile uint64_t hb_seq = 0;
    uint64_t writes = 0, writes_at_last_status = 0, passes = 0;
    uint64_t corrupt = 0, ctl_mismatch = 0;
    /* The verifier starts half a working set away from the writer: in seq mode
     * both sweep at the same speed, and a verifier in lockstep with the writer
     * would only ever look at pages written a moment before. */
    uint64_t write_cursor = 0, verify_cursor = pages / 2, last_written = 0;
    uint64_t rng = 0x2545F4914F6CDD1Dull; /* xorshift64 state for tern_pattern=random */

    const uint64_t start = mono_ns();
    uint64_t inject_at = prm.inject_stale ? start + 2 * STATUS_NS : 0;
    uint64_t next_hb = start, next_status = start + STATUS_NS;
    /* Rate limiting: a token budget refilled per 10 ms slice. Slices missed
     * because the vCPU was descheduled briefly are made up (so a busy host
     * does not lower the average rate), but at most MAX_CATCHUP_SLICES of them:
     * after a real stall (a migration pause, a post-copy fault) the guest
     * resumes at its normal rate instead of a burst that distorts the dirty rate. */
    uint64_t slice_start = start, tokens = prm.rate ? prm.rate / 100 : 0, token_rem = 0;

    for (;;) {
        ctl_stack = ctl_stack + 1;
        ctl_bss = ctl_bss + 1;
        if (ctl_stack != ctl_bss) {
            ctl_mismatch++;
            emit("CTLMISMATCH stack=%llu bss=%llu", (unsigned long long)ctl_stack,
                 (unsigned long long)ctl_bss);
            ctl_stack = ctl_bss; /* resync: one fault is reported once */
        }

        uint64_t now = mono_ns();
        if (now >= next_hb) {
            hb_seq = hb_seq + 1;
            emit("HB %llu %llu", (unsigned long long)hb_seq, (unsigned long long)(now / 1000000));
            next_hb += SLICE_NS;
            if (next_hb <= now) /* fell behind (stall): no burst of catch-up beats */
                next_hb = now + SLICE_NS;
        }
        if (now >= next_status) {
            emit("STATUS seq=%llu passes=%llu writes=%llu wps=%llu corrupt=%llu ctl_mismatch=%llu",
                 (unsigned long long)hb_seq, (unsigned long long)passes,
                 (unsigned long long)writes, (unsigned long long)(writes - writes_at_last_status),
                 (unsigned long long)corrupt, (unsigned long long)ctl_mismatch);
            writes_at_last_status = writes;
            if (prm.disk) {
                emit("DISKSTATUS seq=%llu passes=%llu writes=%llu wps=%llu corrupt=%llu ioerr=%llu",
                     (unsigned long long)hb_seq, (unsigned long long)disk.passes,
                     (unsigned long long)disk.writes,
                     (unsigned long long)(disk.writes - disk.writes_at_last_status),
                     (unsigned long long)disk.corrupt, (unsigned long long)disk.ioerr);
                disk.writes_at_last_status = disk.writes;
            }
            if (prm.udp_port)
                emit("NETSTATUS seq=%llu rx=%llu tx=%llu", (unsigned long long)hb_seq,
                     (unsigned long long)net.rx, (unsigned long long)net.tx);
            next_status += STATUS_NS;
            if (next_status <= now)
                next_status = now + STATUS_NS;
        }
        if (prm.rate && now - slice_start >= SLICE_NS) {
            /* New slice(s): rate/100 pages each, carrying the remainder so rates
             * that are not multiples of 100 are still met on average. */
            uint64_t slices = (now - slice_start) / SLICE_NS;
            if (slices > MAX_CATCHUP_SLICES) {
                slices = MAX_CATCHUP_SLICES;
                slice_start = now;
            } else {
                slice_start += slices * SLICE_NS;
            }
            token_rem += prm.rate * slices;
            tokens += token_rem / 100;
            token_rem %= 100;
            const uint64_t cap = prm.rate * MAX_CATCHUP_SLICES / 100 + 1;
            if (tokens > cap)
                tokens = cap;
        }

        if (inject_at && now >= inject_at) {
            /* Self-test: make one page and the stack counter stale, as a
             * migration that lost their last write would. The page is the one
             * written last (in seq mode the farthest from being rewritten, so
             * the verifier sees it before the writer repairs it); it is given a
             * generation first if it has none, so "previous" exists. */
            inject_at = 0;
            uint64_t i = last_written;
            uint64_t *pg = (uint64_t *)(ws + i * PAGE_SIZE);
            if (expected[i] == 0) {
                fill_page(pg, i, 1);
                expected[i] = 1;
            }
            fill_page(pg, i, expected[i] - 1);
            ctl_stack = ctl_stack - 1;
        }

        /* Write phase. */
        uint64_t batch = WRITE_BATCH;
        if (prm.rate && tokens < batch)
            batch = tokens;
        if (prm.bursty && (now - start) % (BURST_ON_NS + BURST_OFF_NS) >= BURST_ON_NS) {
            /* Idle half of the burst cycle: no writes, and no budget saved up
             * for a catch-up spike when the next burst starts. */
            batch = 0;
            tokens = 0;
        }
        for (uint64_t k = 0; k < batch; k++) {
            uint64_t i;
            if (prm.random) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                i = rng % pages;
            } else {
                i = write_cursor;
                write_cursor = write_cursor + 1 == pages ? 0 : write_cursor + 1;
            }
            uint64_t *pg = (uint64_t *)(ws + i * PAGE_SIZE);
            /* Check before overwrite: the header must still hold the expected
             * generation. Without this, a page that arrived stale would be
             * silently repaired by its next write whenever the writer gets there
             * before the verifier (always, at max rate in seq mode, where both
             * sweep at the same speed). Two loads; the verifier below checks the
             * whole pattern of pages the writer is not about to touch. */
            if (pg[0] != i || pg[1] != expected[i]) {
                corrupt++;
                emit("CORRUPT page=%llu expected=%llu found=%llu", (unsigned long long)i,
                     (unsigned long long)expected[i], (unsigned long long)pg[1]);
            }
            uint64_t g = expected[i] + 1;
            fill_page(pg, i, g);
            expected[i] = g;
            last_written = i;
        }
        writes += batch;
        if (prm.rate)
            tokens -= batch;

        if (prm.disk)
            disk_step(&disk, &prm, start, now);
        if (prm.udp_port)
            net_step(&net, now);

        /* Verify phase: a chunk per iteration, a pass every `pages` pages. */
        if (prm.verify) {
            for (uint64_t k = 0; k < VERIFY_BATCH; k++) {
                uint64_t *pg = (uint64_t *)(ws + verify_cursor * PAGE_SIZE);
                if (!page_matches(pg, verify_cursor, expected[verify_cursor])) {
                    corrupt++;
                    emit("CORRUPT page=%llu expected=%llu found=%llu",
                         (unsigned long long)verify_cursor,
                         (unsigned long long)expected[verify_cursor], (unsigned long long)pg[1]);
                    /* Resync so one fault is counted once, not once per pass. */
                    fill_page(pg, verify_cursor, expected[verify_cursor]);
                }
                if (++verify_cursor == pages) {
                    verify_cursor = 0;
                    passes++;
                }
            }
        }
    }
}
