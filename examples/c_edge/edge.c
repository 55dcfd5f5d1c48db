/* A splitexit device edge in C: the exported edge step (`splitexit export --target c`) and
 * a ZeroMQ DEALER to the broker, in one single-threaded loop.
 *
 *   zcat t10k-images-idx3-ubyte.gz | tail -c +17 | ./edge tcp://127.0.0.1:5555
 *
 * stdin:  raw uint8 frames, SPLITEXIT_INPUT bytes each, as the model reads them (28 x 28 gray
 *         for Fashion-MNIST, row by row; a colour model's planes one after the other). A
 *         camera is a pipe away: ffmpeg -i /dev/video0 -vf scale=28:28 -pix_fmt gray -f rawvideo -
 * stdout: one line per frame, in the order answers become final:
 *         FRAME CLASS WHERE CONFIDENCE [REASON]
 *         CLASS: the class index, or `unknown` (the frame is unlike anything the model was
 *         trained on: the server's score said so, or the edge's and no answer came)
 *         WHERE: local (the exit was sure), server (a worker answered in time) or fallback
 *         (the exit's answer: REASON deadline, busy, no_worker, wrong_model, bad_request or
 *         unreachable)
 *
 * The rules are the Python edge's (pipeline/edge/producer.py, inflight.py): one request per
 * unsure or unfamiliar frame (the head's unfamiliarity score above its threshold: never
 * answered here, its fallback `unknown`), one frame per request; each has a deadline, and
 * the frame gets the server's answer if it comes first, else the exit's answer; an answer
 * after that is dropped (stale).
 * Every frame gets exactly one answer. Wire messages are one ZeroMQ frame each, so the
 * DEALER sends the REQUEST bytes as they are and reads REPLY / ERROR bytes as they come.
 * Backpressure: while IN_FLIGHT requests wait, stdin is not read.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "splitexit_edge.h"

#define IN_FLIGHT 256              /* requests waiting for an answer at once */
#define SEND_QUEUE 1000            /* requests ZeroMQ holds while the broker is away */
#define KEY_CHARS 40               /* a CURVE key in Z85 */
#define HANDSHAKE_FAILED (ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | \
                          ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)

static const char *const REFUSALS[] = SPLITEXIT_REFUSAL_NAMES;   /* by refusal code */

typedef struct {                   /* an unsure frame whose request is out */
    int open;
    uint32_t msg_id;
    unsigned long frame;
    int32_t cls;                   /* the exit's answer: the fallback (or unknown) */
    double confidence;
    double deadline;               /* monotonic seconds */
} request;

static struct {
    unsigned long frames, local, server, fallback, stale, bad, unfamiliar, unknown;
} counts;
static request table[IN_FLIGHT];
static int waiting;                /* open entries in table */
static int verbose;
static volatile sig_atomic_t stopping;
static int wake[2];                /* the signal handler writes here: it wakes zmq_poll */

static void fail(int status, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    fputs("E: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(status);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void answer(unsigned long frame, int32_t cls, const char *where, double confidence,
                   const char *reason)
{
    if (cls == SPLITEXIT_UNKNOWN) {
        printf("%lu unknown", frame);
        counts.unknown++;
    } else {
        printf("%lu %d", frame, (int)cls);
    }
    printf(" %s %.6f%s%s\n", where, confidence, reason ? " " : "", reason ? reason : "");
}

/* The request leaves the table: with the server's answer `a`, or (NULL) the exit's. */
static void finish(request *r, const splitexit_answer *a, const char *reason)
{
    if (a) {
        answer(r->frame, a->cls, "server", a->confidence, NULL);
        counts.server++;
    } else {
        answer(r->frame, r->cls, "fallback", r->confidence, reason);
        counts.fallback++;
    }
    r->open = 0;
    waiting--;
}

static request *find(uint32_t msg_id)
{
    for (int i = 0; i < IN_FLIGHT; ++i)
        if (table[i].open && table[i].msg_id == msg_id)
            return &table[i];
    return NULL;
}

static void expire(double now)
{
    for (int i = 0; i < IN_FLIGHT; ++i)
        if (table[i].open && table[i].deadline <= now)
            finish(&table[i], NULL, "deadline");
}

static int next_timeout_ms(double now)
{
    double first = INFINITY;
    for (int i = 0; i < IN_FLIGHT; ++i)
        if (table[i].open && table[i].deadline < first)
            first = table[i].deadline;
    if (first == INFINITY)
        return -1;                 /* nothing waits: sleep until a frame or an answer */
    return first <= now ? 0 : (int)ceil((first - now) * 1000.0);
}

/* One frame: answered here, or its REQUEST sent and entered in the table. */
static void step(void *sock, const uint8_t *bytes, uint32_t *msg_id, double deadline_s)
{
    static float pixels[SPLITEXIT_INPUT];
    static uint8_t out[SPLITEXIT_EDGE_BUFFER_BYTES];
    splitexit_decision d;
    unsigned long frame = counts.frames++;
    for (int i = 0; i < SPLITEXIT_INPUT; ++i)
        pixels[i] = (float)bytes[i] / 255.0f;      /* as the Python edge: float32 / 255 */
    int rc = splitexit_edge_step(pixels, *msg_id, out, sizeof out, &d);
    if (rc != 0)
        fail(1, "splitexit_edge_step failed (%d)", rc);
    if (!d.offload) {
        answer(frame, d.cls, "local", d.confidence, NULL);
        counts.local++;
        return;
    }
    counts.unfamiliar += (unsigned long)d.unfamiliar;   /* offloaded, d.cls unknown */
    request *r = NULL;             /* a free entry: stdin is read only while there is one */
    for (int i = 0; i < IN_FLIGHT && !r; ++i)
        if (!table[i].open)
            r = &table[i];
    *r = (request){1, *msg_id, frame, d.cls, d.confidence, now_s() + deadline_s};
    waiting++;
    if (++*msg_id == 0)            /* u32 ids wrap to 1, as the Python edge's */
        *msg_id = 1;
    if (zmq_send(sock, out, d.bytes, ZMQ_DONTWAIT) < 0)
        finish(r, NULL, "unreachable");            /* the send queue is full */
}

/* Every answer waiting on the socket. */
static void receive(void *sock)
{
    static uint8_t msg[SPLITEXIT_ANSWER_MAX_BYTES];
    for (;;) {
        int n = zmq_recv(sock, msg, sizeof msg, ZMQ_DONTWAIT);
        if (n < 0)
            return;                /* EAGAIN: read them all */
        int more = 0;
        size_t size = sizeof more;
        zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &size);
        if (more || (size_t)n > sizeof msg) {      /* not one wire message */
            while (more && zmq_recv(sock, msg, sizeof msg, 0) >= 0)
                zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &size);
            counts.bad++;
            continue;
        }
        splitexit_answer a;
        int kind = splitexit_decode_answer(msg, (size_t)n, &a);
        if (kind < 0) {            /* a broken answer: the deadline decides */
            counts.bad++;
            if (verbose)
                fprintf(stderr, "W: a bad answer (%d) dropped\n", kind);
            continue;
        }
        request *r = find(a.msg_id);
        if (!r) {                  /* its frame has its answer (late, or a second one) */
            counts.stale++;
            if (verbose)
                fprintf(stderr, "I: a late answer for request %lu dropped\n",
                        (unsigned long)a.msg_id);
            continue;
        }
        if (kind == SPLITEXIT_REPLY)
            finish(r, &a, NULL);
        else
            finish(r, NULL, REFUSALS[a.refusal]);
    }
}

/* A rejected CURVE key looks like a silent broker (libzmq #2227): say it once. */
static void watch(void *monitor)
{
    static int told;
    zmq_msg_t event;
    zmq_msg_init(&event);
    while (zmq_msg_recv(&event, monitor, ZMQ_DONTWAIT) >= 0) {
        uint16_t what = 0;
        if (zmq_msg_size(&event) >= sizeof what)
            memcpy(&what, zmq_msg_data(&event), sizeof what);
        zmq_msg_recv(&event, monitor, 0);          /* the second part: the endpoint */
        if ((what & HANDSHAKE_FAILED) && !told) {
            told = 1;
            fprintf(stderr, "E: CURVE handshake with the broker failed: is this edge's key in "
                    "the broker's --allow-edges folder, and --curve-server the broker's "
                    "public key?\n");
        }
    }
    zmq_msg_close(&event);
}

/* The Z85 key named `name` ("public-key" or "secret-key") in a `splitexit keys` file. */
static void read_key(const char *path, const char *name, char key[KEY_CHARS + 1])
{
    char line[256];
    FILE *f = fopen(path, "r");
    if (!f)
        fail(2, "cannot read CURVE key %s: %s", path, strerror(errno));
    while (fgets(line, sizeof line, f)) {
        char *at = strstr(line, name), *open = at ? strchr(at, '"') : NULL;
        if (open && strlen(open) > KEY_CHARS + 1 && open[KEY_CHARS + 1] == '"') {
            memcpy(key, open + 1, KEY_CHARS);
            key[KEY_CHARS] = '\0';
            fclose(f);
            return;
        }
    }
    fclose(f);
    fail(2, "%s holds no %s: make keys with `splitexit keys DIR --name NAME`", path, name);
}

static void stop(int sig)
{
    (void)sig;
    stopping = 1;
    ssize_t woken = write(wake[1], "", 1);          /* fails only if one is waiting */
    (void)woken;
}

static void usage(const char *problem)
{
    fprintf(stderr, "E: %s; usage: edge [--deadline-ms MS] [--curve-secret NAME.key_secret "
            "--curve-server BROKER.key] [-v] [ENDPOINT] < frames\n", problem);
    exit(2);
}

int main(int argc, char **argv)
{
    const char *endpoint = getenv("SPLITEXIT_FRONTEND"), *secret = NULL, *server = NULL;
    double deadline_ms = 100.0;                     /* EdgeConfig.deadline_ms */
    int positional = 0;
    for (int i = 1; i < argc; ++i) {
        const char *arg = argv[i];
        int valued = !strcmp(arg, "--deadline-ms") || !strcmp(arg, "--curve-secret")
                     || !strcmp(arg, "--curve-server");
        if (valued && i + 1 == argc) {
            char problem[64];
            snprintf(problem, sizeof problem, "%s needs a value", arg);
            usage(problem);
        }
        if (!strcmp(arg, "--deadline-ms")) {
            char *end;
            deadline_ms = strtod(argv[++i], &end);
            if (*end || end == argv[i] || !(deadline_ms > 0 && deadline_ms <= 3.6e6))
                usage("--deadline-ms takes milliseconds, more than 0 and at most an hour");
        } else if (!strcmp(arg, "--curve-secret")) {
            secret = argv[++i];
        } else if (!strcmp(arg, "--curve-server")) {
            server = argv[++i];
        } else if (!strcmp(arg, "-v") || !strcmp(arg, "--verbose")) {
            verbose = 1;
        } else if (arg[0] == '-') {
            char problem[96];
            snprintf(problem, sizeof problem, "unknown option %.60s", arg);
            usage(problem);
        } else if (positional++) {
            usage("one ENDPOINT only (the broker's frontend)");
        } else {
            endpoint = arg;
        }
    }
    if (!endpoint)
        endpoint = "tcp://127.0.0.1:5555";         /* pipeline/protocol/endpoints.py */
    if (!secret != !server)
        usage("--curve-secret and --curve-server go together");

    void *ctx = zmq_ctx_new(), *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0, hwm = SEND_QUEUE;
    char identity[64];             /* ours, not the broker's pick: kept across a reconnect */
    snprintf(identity, sizeof identity, "c-edge-%ld", (long)getpid());
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sock, ZMQ_ROUTING_ID, identity, strlen(identity));
    if (secret) {                  /* a CURVE client of the broker (Ironhouse) */
        char public_key[KEY_CHARS + 1], secret_key[KEY_CHARS + 1], server_key[KEY_CHARS + 1];
        if (!zmq_has("curve"))
            fail(2, "this libzmq was built without CURVE: use a broker on loopback "
                 "without keys (--insecure)");
        read_key(secret, "public-key", public_key);
        read_key(secret, "secret-key", secret_key);
        read_key(server, "public-key", server_key);
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, public_key, sizeof public_key);
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret_key, sizeof secret_key);
        zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_key, sizeof server_key);
    }
    zmq_socket_monitor(sock, "inproc://edge-monitor", HANDSHAKE_FAILED);
    void *monitor = zmq_socket(ctx, ZMQ_PAIR);
    zmq_connect(monitor, "inproc://edge-monitor");
    if (zmq_connect(sock, endpoint) != 0)
        fail(2, "cannot connect to %s: %s", endpoint, zmq_strerror(zmq_errno()));

    if (pipe(wake) != 0)
        fail(1, "pipe: %s", strerror(errno));
    struct sigaction on_stop = {0};
    on_stop.sa_handler = stop;     /* SIGINT, SIGTERM: read no more, answer what is out */
    sigaction(SIGINT, &on_stop, NULL);
    sigaction(SIGTERM, &on_stop, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);

    static uint8_t frame[SPLITEXIT_INPUT];
    size_t have = 0;               /* bytes of the next frame read so far */
    uint32_t msg_id = 1;
    int reading = 1;
    for (;;) {
        if (stopping)
            reading = 0;
        if (!reading && !waiting)
            break;
        zmq_pollitem_t items[] = {{sock, 0, ZMQ_POLLIN, 0}, {monitor, 0, ZMQ_POLLIN, 0},
                                  {NULL, wake[0], ZMQ_POLLIN, 0},
                                  {NULL, STDIN_FILENO, ZMQ_POLLIN, 0}};
        int take_frames = reading && waiting < IN_FLIGHT;   /* else: backpressure */
        if (zmq_poll(items, take_frames ? 4 : 3, next_timeout_ms(now_s())) < 0
                && zmq_errno() != EINTR)
            fail(1, "zmq_poll: %s", zmq_strerror(zmq_errno()));
        expire(now_s());           /* first: an answer read after its deadline is late */
        if (items[0].revents & ZMQ_POLLIN)
            receive(sock);
        if (items[1].revents & ZMQ_POLLIN)
            watch(monitor);
        if (items[2].revents & ZMQ_POLLIN) {        /* a signal: the loop's top stops reading */
            char byte;
            ssize_t taken = read(wake[0], &byte, 1);
            (void)taken;
        }
        /* stdin: data (POLLIN), or at a pipe's end POLLHUP, which zmq_poll gives as POLLERR */
        if (take_frames && !stopping && items[3].revents) {
            ssize_t n = read(STDIN_FILENO, frame + have, sizeof frame - have);
            if (n < 0 && errno != EINTR)
                fail(1, "reading frames from stdin: %s", strerror(errno));
            if (n == 0) {
                reading = 0;
                if (have)
                    fprintf(stderr, "W: stdin ended inside a frame (%zu of %d bytes): "
                            "dropped\n", have, SPLITEXIT_INPUT);
            } else if (n > 0 && (have += (size_t)n) == sizeof frame) {
                step(sock, frame, &msg_id, deadline_ms / 1000.0);
                have = 0;
            }
        }
    }
    fprintf(stderr, "I: %lu frames: %lu local, %lu server, %lu fallback; %lu late answers "
            "dropped, %lu bad; %lu unfamiliar, %lu answered unknown\n", counts.frames,
            counts.local, counts.server, counts.fallback, counts.stale, counts.bad,
            counts.unfamiliar, counts.unknown);
    zmq_socket_monitor(sock, NULL, 0);             /* the monitor goes first */
    zmq_setsockopt(monitor, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(monitor);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
