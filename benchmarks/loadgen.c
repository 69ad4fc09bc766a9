/*
 * loadgen: load generator and origin servers for the pyegress benchmarks.
 *
 * Everything talks to 127.0.0.1 only.  One binary, four modes:
 *
 *   loadgen origin [--echo PORT] [--source PORT] [--sink PORT]
 *       Echo server (epoll, one thread), bulk source (on connect reads an
 *       8-byte big-endian byte count, 0 = endless, then streams that many
 *       bytes) and bulk sink (reads and discards).  PORT 0 picks a free port.
 *       Prints {"event":"ready","echo":P,"source":P,"sink":P} and serves until
 *       stdin reaches EOF or SIGTERM.
 *
 *   loadgen bulk  --proto P --proxy ADDR --target ADDR --tunnels N
 *                 (--seconds S | --bytes B) [--dir down|up] [--buf BYTES]
 *   loadgen rate  --proto P --proxy ADDR --target ADDR --concurrency C --seconds S
 *   loadgen idle  --proto P --proxy ADDR --target ADDR --count K
 *                 [--concurrency C] [--hold S] [--setup-timeout S]
 *
 *   P is http (CONNECT), socks5 or none (connect straight to the target).
 *   ADDR is PORT or 127.0.0.1:PORT.  --socks-domain NAME makes the SOCKS5
 *   request use ATYP=domain with NAME instead of the target's IPv4 address.
 *
 * Each client mode prints one JSON object on stdout when done (idle also
 * prints {"event":"ready",...} once its tunnels are open; it then holds them
 * until stdin reaches EOF or --hold seconds pass).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define HS_MAX 2048
#define OUT_MAX 600
#define ORIGIN_MAX_THREADS 512

enum proto { PROTO_NONE, PROTO_HTTP, PROTO_SOCKS5 };

struct cfg {
    enum proto proto;
    struct sockaddr_in proxy;  /* where the client connects (the target for PROTO_NONE) */
    struct sockaddr_in target; /* the origin, as named in CONNECT / SOCKS5 */
    char target_str[64];
    const char *socks_domain;
    int tunnels;
    int concurrency;
    int count;
    double seconds;
    double hold;
    double setup_timeout;
    long long bytes;
    int up;
    size_t buf;
};

/* ------------------------------------------------------------------ utils */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static long nofile_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 1024;
    return (long)rl.rlim_cur;
}

static void parse_addr(const char *s, struct sockaddr_in *sa) {
    char host[64] = "127.0.0.1";
    const char *colon = strrchr(s, ':');
    const char *port = s;
    if (colon) {
        size_t n = (size_t)(colon - s);
        if (n == 0 || n >= sizeof host) die("bad address %s", s);
        memcpy(host, s, n);
        host[n] = 0;
        port = colon + 1;
    }
    char *end;
    long p = strtol(port, &end, 10);
    if (*end || p < 0 || p > 65535) die("bad port in %s", s);
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)p);
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) die("bad IPv4 address %s", host);
    if ((ntohl(sa->sin_addr.s_addr) >> 24) != 127) die("refusing non-loopback address %s", host);
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int send_all(int fd, const void *p, size_t n) {
    const char *b = p;
    while (n > 0) {
        ssize_t k = send(fd, b, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* nearest-rank percentile of a sorted array */
static double pct(const double *v, size_t n, double p) {
    if (n == 0) return NAN;
    size_t idx = (size_t)ceil(p * (double)n);
    if (idx < 1) idx = 1;
    if (idx > n) idx = n;
    return v[idx - 1];
}

static void print_num(const char *key, double v, int last) {
    if (isnan(v))
        printf("\"%s\":null%s", key, last ? "" : ",");
    else
        printf("\"%s\":%.6f%s", key, v, last ? "" : ",");
}

/* -------------------------------------------------------------- handshake */
/*
 * A handshake is a list of stages; even stages send, odd stages receive.
 * HTTP: [CONNECT request, response].  SOCKS5: [greeting, method reply,
 * request, reply].  The origins never speak first, so nothing can follow the
 * last reply before we send; leftover bytes are therefore a protocol error.
 */

static int hs_nstages(const struct cfg *c) {
    return c->proto == PROTO_HTTP ? 2 : c->proto == PROTO_SOCKS5 ? 4 : 0;
}

static int hs_out(const struct cfg *c, int stage, char *out, size_t cap) {
    if (c->proto == PROTO_HTTP)
        return snprintf(out, cap, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", c->target_str,
                        c->target_str);
    if (stage == 0) {
        out[0] = 5; /* version */
        out[1] = 1; /* one method */
        out[2] = 0; /* no authentication */
        return 3;
    }
    int n = 0;
    out[n++] = 5;
    out[n++] = 1; /* CONNECT */
    out[n++] = 0;
    if (c->socks_domain) {
        size_t l = strlen(c->socks_domain);
        out[n++] = 3;
        out[n++] = (char)l;
        memcpy(out + n, c->socks_domain, l);
        n += (int)l;
    } else {
        out[n++] = 1;
        memcpy(out + n, &c->target.sin_addr, 4);
        n += 4;
    }
    memcpy(out + n, &c->target.sin_port, 2);
    return n + 2;
}

/* 1 = stage complete (*used bytes consumed), 0 = need more, -1 = error */
static int hs_in(const struct cfg *c, int stage, const unsigned char *b, int len, int *used) {
    if (c->proto == PROTO_HTTP) {
        const unsigned char *end = len > 0 ? memmem(b, (size_t)len, "\r\n\r\n", 4) : NULL;
        if (!end) return len >= HS_MAX ? -1 : 0;
        *used = (int)(end - b) + 4;
        if (len < 12 || memcmp(b, "HTTP/1.", 7) != 0 || memcmp(b + 9, "200", 3) != 0) return -1;
        return 1;
    }
    if (stage == 1) {
        if (len < 2) return 0;
        *used = 2;
        return (b[0] == 5 && b[1] == 0) ? 1 : -1;
    }
    if (len < 5) return 0;
    if (b[0] != 5 || b[1] != 0) return -1;
    int need;
    switch (b[3]) {
    case 1: need = 10; break;
    case 4: need = 22; break;
    case 3: need = 4 + 1 + b[4] + 2; break;
    default: return -1;
    }
    if (len < need) return 0;
    *used = need;
    return 1;
}

static int hs_blocking(const struct cfg *c, int fd) {
    char out[OUT_MAX];
    unsigned char in[HS_MAX];
    int n = hs_nstages(c);
    for (int st = 0; st < n; st++) {
        if (!(st & 1)) {
            int l = hs_out(c, st, out, sizeof out);
            if (send_all(fd, out, (size_t)l) < 0) return -1;
            continue;
        }
        int inlen = 0;
        for (;;) {
            int used = 0;
            int r = hs_in(c, st, in, inlen, &used);
            if (r < 0) return -1;
            if (r > 0) {
                if (used != inlen) return -1;
                break;
            }
            ssize_t k = recv(fd, in + inlen, sizeof in - (size_t)inlen, 0);
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) return -1;
            inlen += (int)k;
        }
    }
    return 0;
}

static int open_tunnel_blocking(const struct cfg *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    set_nodelay(fd);
    struct timeval tv = {.tv_sec = 10, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (const struct sockaddr *)&c->proxy, sizeof c->proxy) < 0 ||
        hs_blocking(c, fd) < 0) {
        close(fd);
        return -1;
    }
    /* while streaming, wake up often enough to notice the deadline */
    tv.tv_sec = 1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

/* ------------------------------------------------------------------- bulk */

struct bulk_shared {
    const struct cfg *c;
    pthread_barrier_t ready, go;
    double t_start, t_end;
};

struct bulk_thread {
    struct bulk_shared *sh;
    pthread_t th;
    long long bytes;
    double t_done;
    int ok;
    int stalled;
};

static void *bulk_run(void *arg) {
    struct bulk_thread *t = arg;
    const struct cfg *c = t->sh->c;
    int fd = open_tunnel_blocking(c);
    t->ok = fd >= 0;
    if (fd >= 0 && !c->up) {
        uint64_t want = htobe64((uint64_t)c->bytes);
        if (send_all(fd, &want, sizeof want) < 0) t->ok = 0;
    }
    pthread_barrier_wait(&t->sh->ready);
    pthread_barrier_wait(&t->sh->go);
    if (!t->ok) {
        if (fd >= 0) close(fd);
        return NULL;
    }
    char *buf = malloc(c->buf);
    if (!buf) die("out of memory");
    memset(buf, 'u', c->buf);
    const double t_end = t->sh->t_end;
    const int by_time = c->bytes == 0;
    for (;;) {
        ssize_t k;
        if (c->up) {
            size_t n = c->buf;
            if (!by_time && (long long)n > c->bytes - t->bytes) n = (size_t)(c->bytes - t->bytes);
            k = send(fd, buf, n, MSG_NOSIGNAL);
        } else {
            k = recv(fd, buf, c->buf, 0);
        }
        double t_now = now_s();
        if (k < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (by_time && t_now >= t_end) break;
            continue;
        }
        if (k <= 0) {
            if (by_time ? t_now < t_end : t->bytes < c->bytes) t->stalled = 1;
            break;
        }
        if (by_time && t_now > t_end) break;
        t->bytes += k;
        if (!by_time && t->bytes >= c->bytes) {
            if (c->up) {
                /* wait until the sink has read everything and closed */
                shutdown(fd, SHUT_WR);
                char tmp[64];
                while (recv(fd, tmp, sizeof tmp, 0) > 0) {
                }
            }
            t->t_done = now_s();
            break;
        }
    }
    free(buf);
    close(fd);
    return NULL;
}

static int mode_bulk(const struct cfg *c) {
    if (c->tunnels < 1) die("--tunnels must be >= 1");
    if (c->bytes == 0 && c->seconds <= 0) die("bulk needs --seconds or --bytes");
    double cpu0 = cpu_seconds();
    double t0 = now_s();
    struct bulk_shared sh = {.c = c};
    pthread_barrier_init(&sh.ready, NULL, (unsigned)c->tunnels + 1);
    pthread_barrier_init(&sh.go, NULL, (unsigned)c->tunnels + 1);
    struct bulk_thread *ts = calloc((size_t)c->tunnels, sizeof *ts);
    if (!ts) die("out of memory");
    for (int i = 0; i < c->tunnels; i++) {
        ts[i].sh = &sh;
        if (pthread_create(&ts[i].th, NULL, bulk_run, &ts[i]) != 0) die("pthread_create");
    }
    pthread_barrier_wait(&sh.ready);
    double setup = now_s() - t0;
    sh.t_start = now_s();
    sh.t_end = sh.t_start + (c->bytes == 0 ? c->seconds : 1e9);
    pthread_barrier_wait(&sh.go);
    long long total = 0;
    int ok = 0, stalled = 0;
    double last = sh.t_start;
    for (int i = 0; i < c->tunnels; i++) {
        pthread_join(ts[i].th, NULL);
        total += ts[i].bytes;
        ok += ts[i].ok;
        stalled += ts[i].stalled;
        if (ts[i].t_done > last) last = ts[i].t_done;
    }
    double elapsed = c->bytes == 0 ? c->seconds : last - sh.t_start;
    double cpu = cpu_seconds() - cpu0;
    printf("{\"mode\":\"bulk\",\"dir\":\"%s\",\"tunnels\":%d,\"ok\":%d,\"stalled\":%d,"
           "\"bytes\":%lld,",
           c->up ? "up" : "down", c->tunnels, ok, stalled, total);
    print_num("seconds", elapsed, 0);
    print_num("setup_s", setup, 0);
    print_num("mb_per_s", elapsed > 0 ? (double)total / elapsed / 1e6 : NAN, 0);
    print_num("cpu_s", cpu, 1);
    printf("}\n");
    free(ts);
    return ok == c->tunnels && stalled == 0 ? 0 : 1;
}

/* ------------------------------------------------- epoll engine: rate/idle */

enum { ST_FREE, ST_CONNECTING, ST_HS, ST_ECHO, ST_IDLE };

struct conn {
    int fd;
    int state;
    int stage;
    int inlen;
    int outlen;
    int outoff;
    uint32_t interest;
    double t0;
    unsigned char in[HS_MAX];
    char out[OUT_MAX];
};

struct engine {
    const struct cfg *c;
    int ep;
    int nst;
    int idle_mode;
    double t_end; /* rate: stop time; idle: setup deadline */
    /* results */
    double *lat;
    size_t nlat, caplat;
    long completed;
    long err_connect, err_hs, err_io, dropped;
    int open_now;
};

static void eng_close(struct engine *e, struct conn *k) {
    if (k->fd >= 0) {
        close(k->fd);
        e->open_now--;
    }
    k->fd = -1;
    k->state = ST_FREE;
}

static void eng_interest(struct engine *e, struct conn *k, uint32_t ev) {
    if (k->interest == ev) return;
    struct epoll_event ee = {.events = ev, .data.ptr = k};
    epoll_ctl(e->ep, EPOLL_CTL_MOD, k->fd, &ee);
    k->interest = ev;
}

static int eng_start(struct engine *e, struct conn *k) {
    k->t0 = now_s();
    k->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (k->fd < 0) {
        e->err_connect++;
        k->state = ST_FREE;
        return -1;
    }
    e->open_now++;
    set_nodelay(k->fd);
    k->stage = 0;
    k->inlen = 0;
    k->outlen = 0;
    k->outoff = 0;
    if (connect(k->fd, (const struct sockaddr *)&e->c->proxy, sizeof e->c->proxy) < 0 &&
        errno != EINPROGRESS) {
        e->err_connect++;
        eng_close(e, k);
        return -1;
    }
    k->state = ST_CONNECTING;
    k->interest = EPOLLOUT;
    struct epoll_event ee = {.events = EPOLLOUT, .data.ptr = k};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, k->fd, &ee) < 0) {
        e->err_connect++;
        eng_close(e, k);
        return -1;
    }
    return 0;
}

/* returns 1 when the tunnel finished its echo, 0 when still going, -1 on failure */
static int eng_drive(struct engine *e, struct conn *k) {
    for (;;) {
        if (k->state == ST_HS && k->stage < e->nst && !(k->stage & 1)) {
            if (k->outlen == 0) {
                k->outlen = hs_out(e->c, k->stage, k->out, sizeof k->out);
                k->outoff = 0;
            }
            while (k->outoff < k->outlen) {
                ssize_t w = send(k->fd, k->out + k->outoff, (size_t)(k->outlen - k->outoff),
                                 MSG_NOSIGNAL);
                if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
                    eng_interest(e, k, EPOLLOUT);
                    return 0;
                }
                if (w <= 0) {
                    e->err_hs++;
                    return -1;
                }
                k->outoff += (int)w;
            }
            k->stage++;
            k->outlen = 0;
            k->inlen = 0;
            eng_interest(e, k, EPOLLIN);
            return 0; /* wait for the reply */
        }
        if (k->state == ST_HS && k->stage < e->nst) {
            ssize_t r = recv(k->fd, k->in + k->inlen, sizeof k->in - (size_t)k->inlen, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
            if (r <= 0) {
                e->err_hs++;
                return -1;
            }
            k->inlen += (int)r;
            int used = 0;
            int p = hs_in(e->c, k->stage, k->in, k->inlen, &used);
            if (p < 0 || (p > 0 && used != k->inlen)) {
                e->err_hs++;
                return -1;
            }
            if (p == 0) return 0;
            k->stage++;
            continue;
        }
        if (k->state == ST_HS) {
            /* handshake done: one byte through the tunnel to the echo origin */
            ssize_t w = send(k->fd, "e", 1, MSG_NOSIGNAL);
            if (w != 1) {
                e->err_io++;
                return -1;
            }
            k->state = ST_ECHO;
            eng_interest(e, k, EPOLLIN);
            return 0;
        }
        if (k->state == ST_ECHO) {
            char b[16];
            ssize_t r = recv(k->fd, b, sizeof b, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
            if (r != 1 || b[0] != 'e') {
                e->err_io++;
                return -1;
            }
            return 1;
        }
        return 0;
    }
}

static int eng_event(struct engine *e, struct conn *k, uint32_t ev) {
    if (k->state == ST_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            e->err_connect++;
            return -1;
        }
        k->state = ST_HS;
        return eng_drive(e, k);
    }
    if (k->state == ST_IDLE) {
        (void)ev;
        e->dropped++;
        return -1;
    }
    return eng_drive(e, k);
}

static void eng_record(struct engine *e, double v) {
    if (e->nlat == e->caplat) {
        e->caplat = e->caplat ? e->caplat * 2 : 65536;
        e->lat = realloc(e->lat, e->caplat * sizeof *e->lat);
        if (!e->lat) die("out of memory");
    }
    e->lat[e->nlat++] = v;
}

static void print_latency(struct engine *e) {
    qsort(e->lat, e->nlat, sizeof *e->lat, cmp_double);
    print_num("p50_ms", pct(e->lat, e->nlat, 0.50) * 1e3, 0);
    print_num("p90_ms", pct(e->lat, e->nlat, 0.90) * 1e3, 0);
    print_num("p99_ms", pct(e->lat, e->nlat, 0.99) * 1e3, 0);
    print_num("max_ms", e->nlat ? e->lat[e->nlat - 1] * 1e3 : NAN, 0);
}

static int mode_rate(const struct cfg *c) {
    if (c->concurrency < 1 || c->seconds <= 0) die("rate needs --concurrency and --seconds");
    struct engine e = {.c = c, .nst = hs_nstages(c)};
    e.ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *cs = calloc((size_t)c->concurrency, sizeof *cs);
    if (!cs) die("out of memory");
    double cpu0 = cpu_seconds();
    double t_start = now_s();
    e.t_end = t_start + c->seconds;
    for (int i = 0; i < c->concurrency; i++) {
        cs[i].fd = -1;
        eng_start(&e, &cs[i]);
    }
    struct epoll_event evs[256];
    for (;;) {
        double left = e.t_end - now_s();
        if (left <= 0) break;
        int n = epoll_wait(e.ep, evs, 256, (int)(left * 1000) + 1);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            struct conn *k = evs[i].data.ptr;
            if (k->state == ST_FREE) continue;
            int r = eng_event(&e, k, evs[i].events);
            if (r == 0) continue;
            double t = now_s();
            if (r > 0 && t <= e.t_end) {
                e.completed++;
                eng_record(&e, t - k->t0);
            }
            eng_close(&e, k);
            if (t < e.t_end) eng_start(&e, k);
        }
        /* slots whose start failed: retry */
        for (int i = 0; i < c->concurrency; i++)
            if (cs[i].state == ST_FREE && now_s() < e.t_end) eng_start(&e, &cs[i]);
    }
    double elapsed = now_s() - t_start;
    int inflight = 0;
    for (int i = 0; i < c->concurrency; i++)
        if (cs[i].state != ST_FREE) {
            inflight++;
            eng_close(&e, &cs[i]);
        }
    double cpu = cpu_seconds() - cpu0;
    printf("{\"mode\":\"rate\",\"concurrency\":%d,\"completed\":%ld,\"err_connect\":%ld,"
           "\"err_handshake\":%ld,\"err_io\":%ld,\"inflight_at_end\":%d,",
           c->concurrency, e.completed, e.err_connect, e.err_hs, e.err_io, inflight);
    print_num("seconds", elapsed, 0);
    print_num("tunnels_per_s", (double)e.completed / c->seconds, 0);
    print_latency(&e);
    print_num("cpu_s", cpu, 1);
    printf("}\n");
    free(cs);
    free(e.lat);
    return e.completed > 0 ? 0 : 1;
}

static int mode_idle(const struct cfg *c) {
    if (c->count < 1) die("idle needs --count");
    int conc = c->concurrency > 0 ? c->concurrency : 64;
    long need = (long)c->count + 64;
    if (nofile_limit() < need)
        die("RLIMIT_NOFILE %ld too low for %d tunnels", nofile_limit(), c->count);
    struct engine e = {.c = c, .nst = hs_nstages(c), .idle_mode = 1};
    e.ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *cs = calloc((size_t)c->count, sizeof *cs);
    if (!cs) die("out of memory");
    for (int i = 0; i < c->count; i++) cs[i].fd = -1;
    double cpu0 = cpu_seconds();
    double t0 = now_s();
    e.t_end = t0 + c->setup_timeout;
    int launched = 0, pending = 0, failed = 0;
    long established = 0;
    struct epoll_event evs[256];
    while (established + failed < c->count && now_s() < e.t_end) {
        while (pending < conc && launched < c->count) {
            struct conn *k = &cs[launched++];
            if (eng_start(&e, k) == 0)
                pending++;
            else
                failed++;
        }
        if (pending == 0) break;
        int n = epoll_wait(e.ep, evs, 256, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            struct conn *k = evs[i].data.ptr;
            if (k->state == ST_FREE) continue;
            int was_idle = k->state == ST_IDLE;
            int r = eng_event(&e, k, evs[i].events);
            if (r == 0) continue;
            if (r > 0) {
                eng_record(&e, now_s() - k->t0);
                k->state = ST_IDLE;
                eng_interest(&e, k, EPOLLIN | EPOLLRDHUP);
                established++;
                pending--;
                continue;
            }
            if (was_idle) {
                established--;
            } else {
                pending--;
            }
            failed++;
            eng_close(&e, k);
        }
    }
    double setup = now_s() - t0;
    printf("{\"event\":\"ready\",\"ok\":%ld,\"failed\":%d,", established, failed);
    print_num("setup_s", setup, 1);
    printf("}\n");
    fflush(stdout);

    /* hold until stdin closes or the hold time passes */
    struct epoll_event se = {.events = EPOLLIN, .data.ptr = NULL};
    int watch_stdin = epoll_ctl(e.ep, EPOLL_CTL_ADD, 0, &se) == 0;
    double hold_end = now_s() + c->hold;
    int done = 0;
    while (!done) {
        double left = hold_end - now_s();
        if (left <= 0) break;
        int n = epoll_wait(e.ep, evs, 256, (int)(left * 1000) + 1);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            struct conn *k = evs[i].data.ptr;
            if (k == NULL) {
                char b[256];
                ssize_t r = read(0, b, sizeof b);
                if (r <= 0) done = 1;
                continue;
            }
            if (k->state != ST_IDLE) {
                /* a handshake still in flight after the setup deadline */
                eng_close(&e, k);
                continue;
            }
            e.dropped++;
            eng_close(&e, k);
        }
    }
    (void)watch_stdin;
    long still_open = 0;
    for (int i = 0; i < c->count; i++)
        if (cs[i].state == ST_IDLE) still_open++;
    for (int i = 0; i < c->count; i++)
        if (cs[i].state != ST_FREE) eng_close(&e, &cs[i]);
    double cpu = cpu_seconds() - cpu0;
    printf("{\"mode\":\"idle\",\"count\":%d,\"ok\":%ld,\"failed\":%d,\"dropped\":%ld,"
           "\"open_at_end\":%ld,\"err_connect\":%ld,\"err_handshake\":%ld,\"err_io\":%ld,",
           c->count, established, failed, e.dropped, still_open, e.err_connect, e.err_hs,
           e.err_io);
    print_num("setup_s", setup, 0);
    print_latency(&e);
    print_num("cpu_s", cpu, 1);
    printf("}\n");
    free(cs);
    free(e.lat);
    return established == c->count && e.dropped == 0 ? 0 : 1;
}

/* ---------------------------------------------------------------- origins */

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind %d: %s", port, strerror(errno));
    if (listen(fd, 4096) < 0) die("listen: %s", strerror(errno));
    return fd;
}

static int local_port(int fd) {
    struct sockaddr_in sa;
    socklen_t l = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &l);
    return ntohs(sa.sin_port);
}

struct echo_conn {
    int fd;
    int plen, poff;
    char *pend;
};

static int echo_listen_marker;

static void *echo_loop(void *arg) {
    int lfd = *(int *)arg;
    fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = &echo_listen_marker};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &le);
    static char buf[65536];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &echo_listen_marker) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    set_nodelay(fd);
                    struct echo_conn *ec = calloc(1, sizeof *ec);
                    if (!ec) {
                        close(fd);
                        continue;
                    }
                    ec->fd = fd;
                    struct epoll_event ee = {.events = EPOLLIN, .data.ptr = ec};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ee);
                }
                continue;
            }
            struct echo_conn *ec = evs[i].data.ptr;
            int dead = 0;
            if (ec->plen > ec->poff) {
                ssize_t w = send(ec->fd, ec->pend + ec->poff, (size_t)(ec->plen - ec->poff),
                                 MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN && errno != EINTR) dead = 1;
                if (w > 0) ec->poff += (int)w;
                if (!dead && ec->poff >= ec->plen) {
                    ec->plen = ec->poff = 0;
                    struct epoll_event ee = {.events = EPOLLIN, .data.ptr = ec};
                    epoll_ctl(ep, EPOLL_CTL_MOD, ec->fd, &ee);
                }
            } else {
                ssize_t r = recv(ec->fd, buf, sizeof buf, 0);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) dead = 1;
                if (r > 0) {
                    ssize_t w = send(ec->fd, buf, (size_t)r, MSG_NOSIGNAL);
                    if (w < 0 && errno != EAGAIN && errno != EINTR) dead = 1;
                    if (w < 0) w = 0;
                    if (!dead && w < r) {
                        char *p = realloc(ec->pend, (size_t)(r - w));
                        if (!p) {
                            dead = 1;
                        } else {
                            ec->pend = p;
                            memcpy(p, buf + w, (size_t)(r - w));
                            ec->plen = (int)(r - w);
                            ec->poff = 0;
                            struct epoll_event ee = {.events = EPOLLOUT, .data.ptr = ec};
                            epoll_ctl(ep, EPOLL_CTL_MOD, ec->fd, &ee);
                        }
                    }
                }
            }
            if (dead) {
                close(ec->fd);
                free(ec->pend);
                free(ec);
            }
        }
    }
    return NULL;
}

static atomic_int origin_threads;
static size_t origin_buf = 256 * 1024;

struct stream_arg {
    int fd;
    int source;
};

static void *stream_conn(void *arg) {
    struct stream_arg sa = *(struct stream_arg *)arg;
    free(arg);
    char *buf = malloc(origin_buf);
    if (!buf) goto out;
    if (sa.source) {
        memset(buf, 'd', origin_buf);
        uint64_t want_be;
        size_t got = 0;
        while (got < sizeof want_be) {
            ssize_t r = recv(sa.fd, (char *)&want_be + got, sizeof want_be - got, 0);
            if (r <= 0) goto out;
            got += (size_t)r;
        }
        uint64_t want = be64toh(want_be), sent = 0;
        while (want == 0 || sent < want) {
            size_t n = origin_buf;
            if (want && n > want - sent) n = (size_t)(want - sent);
            ssize_t w = send(sa.fd, buf, n, MSG_NOSIGNAL);
            if (w <= 0) break;
            sent += (uint64_t)w;
        }
        shutdown(sa.fd, SHUT_WR);
    }
    while (recv(sa.fd, buf, origin_buf, 0) > 0) {
    }
out:
    free(buf);
    close(sa.fd);
    atomic_fetch_sub(&origin_threads, 1);
    return NULL;
}

struct acceptor {
    int lfd;
    int source;
};

static void *stream_accept(void *arg) {
    struct acceptor *a = arg;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    for (;;) {
        int fd = accept4(a->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            usleep(10000);
            continue;
        }
        if (atomic_fetch_add(&origin_threads, 1) >= ORIGIN_MAX_THREADS) {
            atomic_fetch_sub(&origin_threads, 1);
            close(fd);
            continue;
        }
        struct stream_arg *sa = malloc(sizeof *sa);
        pthread_t th;
        if (!sa) {
            close(fd);
            atomic_fetch_sub(&origin_threads, 1);
            continue;
        }
        sa->fd = fd;
        sa->source = a->source;
        if (pthread_create(&th, &attr, stream_conn, sa) != 0) {
            free(sa);
            close(fd);
            atomic_fetch_sub(&origin_threads, 1);
        }
    }
    return NULL;
}

static int mode_origin(int echo_port, int source_port, int sink_port) {
    static int efd;
    static struct acceptor src, snk;
    pthread_t th;
    int ep = -1, sp = -1, kp = -1;
    if (echo_port >= 0) {
        efd = listen_on(echo_port);
        ep = local_port(efd);
        if (pthread_create(&th, NULL, echo_loop, &efd) != 0) die("pthread_create");
    }
    if (source_port >= 0) {
        src.lfd = listen_on(source_port);
        src.source = 1;
        sp = local_port(src.lfd);
        if (pthread_create(&th, NULL, stream_accept, &src) != 0) die("pthread_create");
    }
    if (sink_port >= 0) {
        snk.lfd = listen_on(sink_port);
        snk.source = 0;
        kp = local_port(snk.lfd);
        if (pthread_create(&th, NULL, stream_accept, &snk) != 0) die("pthread_create");
    }
    printf("{\"event\":\"ready\",\"echo\":%d,\"source\":%d,\"sink\":%d}\n", ep, sp, kp);
    fflush(stdout);
    char b[256];
    for (;;) {
        ssize_t r = read(0, b, sizeof b);
        if (r == 0 || (r < 0 && errno != EINTR)) break;
    }
    return 0;
}

/* ------------------------------------------------------------------- main */

static void usage(void) {
    fputs("usage: loadgen origin [--echo PORT] [--source PORT] [--sink PORT] [--buf BYTES]\n"
          "       loadgen bulk --proto http|socks5|none --proxy ADDR --target ADDR --tunnels N\n"
          "                    (--seconds S | --bytes B) [--dir down|up] [--buf BYTES]\n"
          "       loadgen rate --proto P --proxy ADDR --target ADDR --concurrency C --seconds S\n"
          "       loadgen idle --proto P --proxy ADDR --target ADDR --count K\n"
          "                    [--concurrency C] [--hold S] [--setup-timeout S]\n"
          "       common: [--socks-domain NAME]\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) usage();
    const char *mode = argv[1];
    struct cfg c = {
        .proto = PROTO_NONE,
        .concurrency = 0,
        .hold = 600,
        .setup_timeout = 60,
        .buf = 256 * 1024,
        .tunnels = 1,
    };
    int have_proxy = 0, have_target = 0;
    int echo_port = -1, source_port = -1, sink_port = -1;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--proto")) {
            if (!strcmp(v, "http"))
                c.proto = PROTO_HTTP;
            else if (!strcmp(v, "socks5"))
                c.proto = PROTO_SOCKS5;
            else if (!strcmp(v, "none"))
                c.proto = PROTO_NONE;
            else
                die("unknown --proto %s", v);
        } else if (!strcmp(a, "--proxy")) {
            parse_addr(v, &c.proxy);
            have_proxy = 1;
        } else if (!strcmp(a, "--target")) {
            parse_addr(v, &c.target);
            have_target = 1;
        } else if (!strcmp(a, "--socks-domain")) {
            if (strlen(v) > 255) die("domain too long");
            c.socks_domain = v;
        } else if (!strcmp(a, "--tunnels")) {
            c.tunnels = atoi(v);
        } else if (!strcmp(a, "--concurrency")) {
            c.concurrency = atoi(v);
        } else if (!strcmp(a, "--count")) {
            c.count = atoi(v);
        } else if (!strcmp(a, "--seconds")) {
            c.seconds = atof(v);
        } else if (!strcmp(a, "--hold")) {
            c.hold = atof(v);
        } else if (!strcmp(a, "--setup-timeout")) {
            c.setup_timeout = atof(v);
        } else if (!strcmp(a, "--bytes")) {
            c.bytes = atoll(v);
        } else if (!strcmp(a, "--dir")) {
            if (!strcmp(v, "up"))
                c.up = 1;
            else if (!strcmp(v, "down"))
                c.up = 0;
            else
                die("unknown --dir %s", v);
        } else if (!strcmp(a, "--buf")) {
            c.buf = (size_t)atol(v);
            if (c.buf < 4096) die("--buf too small");
        } else if (!strcmp(a, "--echo")) {
            echo_port = atoi(v);
        } else if (!strcmp(a, "--source")) {
            source_port = atoi(v);
        } else if (!strcmp(a, "--sink")) {
            sink_port = atoi(v);
        } else {
            usage();
        }
    }
    if (!strcmp(mode, "origin")) {
        origin_buf = c.buf;
        if (echo_port < 0 && source_port < 0 && sink_port < 0) usage();
        return mode_origin(echo_port, source_port, sink_port);
    }
    if (!have_target) die("--target is required");
    if (!have_proxy) {
        if (c.proto != PROTO_NONE) die("--proxy is required");
        c.proxy = c.target;
    }
    if (c.proto == PROTO_NONE) c.proxy = c.target;
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &c.target.sin_addr, ip, sizeof ip);
    snprintf(c.target_str, sizeof c.target_str, "%s:%d", ip, ntohs(c.target.sin_port));
    if (!strcmp(mode, "bulk")) return mode_bulk(&c);
    if (!strcmp(mode, "rate")) return mode_rate(&c);
    if (!strcmp(mode, "idle")) return mode_idle(&c);
    usage();
    return 2;
}
