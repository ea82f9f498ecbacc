/*
 * client.c — the C client of the machine broker (prealloc/client.h; the protocol is
 * docs/protocol.md, version 1).
 *
 * One call is one round trip under the client's mutex: encode the request into the
 * client's send buffer (bounded: a request over PA_CLIENT_MAX_MESSAGE is -EMSGSIZE before
 * anything is sent), one sendmsg, then recvmsg until the answer with our id arrives
 * (events, which carry no id, are skipped and their descriptors closed). The answer is
 * checked field by field against the protocol; the descriptors that came with it are
 * counted against its "fds" and what the operation takes, and every one that is not
 * handed on is closed on every path out (answer_close).
 *
 * A received answer that breaks the protocol leaves the conversation out of step (the
 * next answer could be this one's), so the client marks itself broken and refuses every
 * later call (-ENOTCONN) rather than pair a request with the wrong answer.
 */
#define _GNU_SOURCE
#include "prealloc/client.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "client_json.h"

#ifndef F_SEAL_SHRINK /* older libc headers: the values are the kernel's ABI */
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#define F_SEAL_SHRINK 0x0002
#endif

/* Request ids stay below 2**53 (the protocol: exact in every JSON reader). */
#define REQUEST_ID_LIMIT (1ull << 53)
/* How long close waits for the broker's answer to "bye" before it just closes. */
#define BYE_WAIT_MS 1000

typedef struct mapping {
    uint64_t allocation_id;
    void *addr;
    size_t size;
} mapping_t;

struct pa_client {
    int fd;
    pid_t owner_pid;       /* the process that connected; a forked child gets -ECHILD */
    pthread_mutex_t lock;  /* held for each whole round trip and for the mapping list */
    uint64_t next_id;
    bool broken;           /* the conversation is out of step: every call -ENOTCONN */
    pa_client_error_t error;
    mapping_t *mappings;
    size_t nmappings, mappings_capacity;
    char send_buf[PA_CLIENT_MAX_MESSAGE + 1];
    char recv_buf[PA_CLIENT_MAX_MESSAGE + 1]; /* +1: an answer that fills it is too long */
};

/* ---- errors ---- */

static void set_error(pa_client_t *c, int code, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void set_error(pa_client_t *c, int code, const char *type, const char *fmt, ...) {
    c->error.code = code;
    snprintf(c->error.type, sizeof c->error.type, "%s", type ? type : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error.message, sizeof c->error.message, fmt, ap);
    va_end(ap);
}

static void clear_error(pa_client_t *c) { memset(&c->error, 0, sizeof c->error); }

/* The broker's error types (docs/protocol.md, "Answer") to errno. */
static int errno_of_type(const char *type) {
    static const struct {
        const char *type;
        int code;
    } table[] = {
        {"ValueError", EINVAL},          {"TypeError", EINVAL},          {"KeyError", ENOENT},
        {"PermissionError", EPERM},      {"AllocationError", EIO},       {"InsufficientResources", ENOMEM},
        {"QuotaExceeded", EDQUOT},       {"Timeout", ETIMEDOUT},         {"RateLimited", EAGAIN},
        {"ProtocolError", EPROTO},       {"VersionError", EPROTONOSUPPORT}, {"Closed", ESHUTDOWN},
        {"WrongResourceType", EMEDIUMTYPE},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(type, table[i].type) == 0) return -table[i].code;
    return -EREMOTEIO;
}

/* ---- an answer and its descriptors ---- */

typedef struct answer {
    pa__json_doc_t doc;
    const pa__json_node_t *result; /* the "result" node (NULL when absent) */
    int fds[PA_CLIENT_MAX_FDS];
    size_t nfds;
} answer_t;

static void close_fds(int *fds, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0) close(fds[i]);
}

/* Frees the document and closes every descriptor not taken (set to -1) by the caller. */
static void answer_close(answer_t *a) {
    close_fds(a->fds, a->nfds);
    a->nfds = 0;
    pa__json_doc_free(&a->doc);
    a->result = NULL;
}

/* A protocol failure on the receiving side: the conversation is out of step. */
static int broken(pa_client_t *c, int code, const char *fmt, const char *detail) {
    c->broken = true;
    set_error(c, code, "", fmt, detail);
    return code;
}

/* ---- sending ---- */

/* Opens {"v":1,"id":N,"op":op,"args":{ — the caller writes the arguments' members. */
static void request_begin(pa_client_t *c, pa__jw_t *w, const char *op) {
    pa__jw_init(w, c->send_buf, sizeof c->send_buf);
    pa__jw_object_begin(w);
    pa__jw_key(w, "v");
    pa__jw_u64(w, PA_CLIENT_PROTOCOL_VERSION);
    pa__jw_key(w, "id");
    pa__jw_u64(w, c->next_id);
    pa__jw_key(w, "op");
    pa__jw_string(w, op);
    pa__jw_key(w, "args");
    pa__jw_object_begin(w);
}

/* Receives one message: the text into recv_buf (*len), descriptors into fds. */
static int receive(pa_client_t *c, size_t *len, int *fds, size_t *nfds) {
    *nfds = 0;
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * PA_CLIENT_MAX_FDS)];
    } control;
    struct iovec iov = {.iov_base = c->recv_buf, .iov_len = sizeof c->recv_buf};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    ssize_t n;
    do {
        n = recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        int code = -errno;
        c->broken = true;
        set_error(c, code, "", "recvmsg from the broker: %s", strerror(-code));
        return code;
    }
    /* Take every descriptor first, so that each failure below can close them all. The
     * control buffer holds PA_CLIENT_MAX_FDS; more set MSG_CTRUNC (the kernel drops the
     * ones that did not fit). */
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(h);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof fd, sizeof fd); /* CMSG_DATA need not be int-aligned */
            if (*nfds < PA_CLIENT_MAX_FDS) fds[(*nfds)++] = fd;
            else close(fd);
        }
    }
    if (n == 0) {
        close_fds(fds, *nfds);
        *nfds = 0;
        return broken(c, -ECONNRESET, "%s", "the broker closed the connection");
    }
    if ((msg.msg_flags & MSG_TRUNC) || (size_t)n >= sizeof c->recv_buf) {
        close_fds(fds, *nfds);
        *nfds = 0;
        return broken(c, -EMSGSIZE, "%s", "an answer over MAX_MESSAGE bytes");
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        close_fds(fds, *nfds);
        *nfds = 0;
        return broken(c, -EPROTO, "%s", "an answer with more than MAX_FDS descriptors (MSG_CTRUNC)");
    }
    *len = (size_t)n;
    return 0;
}

static int copy_string(const pa__json_node_t *node, char *out, size_t cap) {
    if (!node || node->type != PA__JSON_STRING) return -EINVAL;
    snprintf(out, cap, "%s", node->str);
    return 0;
}

/* Closes the request w began, sends it and reads its answer into *a. max_fds: how many
 * descriptors this operation takes (more is -EPROTO, all closed). On 0, a->result is the
 * result and a->fds holds the answer's descriptors (the caller closes or keeps them via
 * answer_close). On an error answer: its errno, the broker's type and message kept, no
 * descriptor left open. */
static int round_trip(pa_client_t *c, pa__jw_t *w, size_t max_fds, answer_t *a) {
    memset(a, 0, sizeof *a);
    pa__jw_object_end(w); /* args */
    pa__jw_object_end(w);
    size_t len;
    int rc = pa__jw_finish(w, &len);
    if (rc) {
        set_error(c, rc, "", "the request could not be encoded (%s)",
                  rc == -EMSGSIZE ? "over MAX_MESSAGE bytes" : "an argument is not finite or not UTF-8");
        return rc;
    }
    uint64_t id = c->next_id;
    c->next_id = c->next_id + 1 < REQUEST_ID_LIMIT ? c->next_id + 1 : 1;
    ssize_t sent;
    do {
        sent = send(c->fd, c->send_buf, len, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        rc = -errno;
        /* the broker is gone (EPIPE, ECONNRESET) or the socket is: nothing was asked */
        if (rc == -EPIPE || rc == -ECONNRESET || rc == -ENOTCONN) c->broken = true;
        set_error(c, rc, "", "send to the broker: %s", strerror(-rc));
        return rc;
    }
    for (;;) {
        size_t n;
        if ((rc = receive(c, &n, a->fds, &a->nfds))) return rc;
        size_t offset;
        rc = pa__json_parse(c->recv_buf, n, &a->doc, &offset);
        if (rc) {
            answer_close(a);
            c->broken = true;
            set_error(c, -EPROTO, "", "the broker's answer is not valid JSON (byte %zu)", offset);
            return -EPROTO;
        }
        const pa__json_node_t *root = &a->doc.nodes[0];
        uint64_t v;
        if (root->type != PA__JSON_OBJECT || pa__json_u64(pa__json_get(&a->doc, root, "v"), &v) ||
            v != PA_CLIENT_PROTOCOL_VERSION) {
            answer_close(a);
            return broken(c, -EPROTO, "%s", "the broker's answer is not a version 1 object");
        }
        const pa__json_node_t *id_node = pa__json_get(&a->doc, root, "id");
        if (!id_node && pa__json_get(&a->doc, root, "event")) {
            answer_close(a); /* an event (we never subscribe, but skip it whatever it holds) */
            continue;
        }
        uint64_t answer_id;
        /* "id": null answers a request the broker could not read: ours, the one in flight */
        if (!id_node || (id_node->type != PA__JSON_NULL &&
                         (pa__json_u64(id_node, &answer_id) || answer_id != id))) {
            answer_close(a);
            return broken(c, -EPROTO, "%s", "the broker's answer carries another request's id");
        }
        uint64_t declared = 0;
        const pa__json_node_t *fds_node = pa__json_get(&a->doc, root, "fds");
        if (fds_node && fds_node->type != PA__JSON_NULL && pa__json_u64(fds_node, &declared)) {
            answer_close(a);
            return broken(c, -EPROTO, "%s", "the broker's answer has a malformed \"fds\"");
        }
        if (declared != a->nfds) {
            answer_close(a);
            return broken(c, -EPROTO, "%s", "the broker's answer declares other descriptors than came with it");
        }
        bool ok;
        if (pa__json_bool(pa__json_get(&a->doc, root, "ok"), &ok)) {
            answer_close(a);
            return broken(c, -EPROTO, "%s", "the broker's answer has no \"ok\"");
        }
        if (!ok) {
            const pa__json_node_t *err = pa__json_get(&a->doc, root, "error");
            const pa__json_node_t *type = pa__json_get(&a->doc, err, "type");
            const pa__json_node_t *message = pa__json_get(&a->doc, err, "message");
            if (!type || type->type != PA__JSON_STRING) {
                answer_close(a);
                return broken(c, -EPROTO, "%s", "the broker's error answer names no type");
            }
            rc = errno_of_type(type->str);
            set_error(c, rc, type->str, "%s",
                      message && message->type == PA__JSON_STRING ? message->str : "");
            answer_close(a);
            return rc;
        }
        if (a->nfds > max_fds) {
            answer_close(a);
            set_error(c, -EPROTO, "", "the broker sent %zu descriptors where this operation takes %zu",
                      declared, max_fds);
            return -EPROTO;
        }
        a->result = pa__json_get(&a->doc, root, "result");
        clear_error(c);
        return 0;
    }
}

/* Common entry of every call: checks and takes the lock. */
static int enter(pa_client_t *c) {
    if (!c) return -EINVAL;
    if (getpid() != c->owner_pid) return -ECHILD;
    pthread_mutex_lock(&c->lock);
    if (c->broken) {
        set_error(c, -ENOTCONN, "", "%s", "the connection to the broker is out of step or closed");
        pthread_mutex_unlock(&c->lock);
        return -ENOTCONN;
    }
    return 0;
}

static int leave(pa_client_t *c, int rc) {
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* A bad argument, refused before anything is sent: recorded like any failure. */
static int invalid(pa_client_t *c, const char *what) {
    set_error(c, -EINVAL, "", "invalid argument: %s", what);
    pthread_mutex_unlock(&c->lock);
    return -EINVAL;
}

/* A malformed result: the answer was in step, but not what the protocol promises. */
static int bad_result(pa_client_t *c, const char *what) {
    set_error(c, -EPROTO, "", "the broker's result lacks %s", what);
    return -EPROTO;
}

/* ---- connecting ---- */

static bool path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* The protocol's default order (docs/protocol.md, "Where the socket is"). */
static int default_socket_path(char *out, size_t cap) {
    const char *env = secure_getenv(PA_CLIENT_SOCKET_ENV);
    if (env && *env) { /* named by the user: used even when absent (connect says ENOENT) */
        if ((size_t)snprintf(out, cap, "%s", env) >= cap) return -ENAMETOOLONG;
        return 0;
    }
    if (path_exists(PA_CLIENT_SYSTEM_SOCKET)) {
        snprintf(out, cap, "%s", PA_CLIENT_SYSTEM_SOCKET);
        return 0;
    }
    const char *runtime = secure_getenv("XDG_RUNTIME_DIR");
    if (runtime && *runtime) {
        if ((size_t)snprintf(out, cap, "%s/prealloc-broker.sock", runtime) < cap && path_exists(out)) return 0;
    }
    char dir[64];
    uid_t uid = geteuid(); /* who SO_PEERCRED names us to the broker */
    snprintf(dir, sizeof dir, "/tmp/prealloc-broker-%u", (unsigned)uid);
    struct stat st;
    if (lstat(dir, &st) != 0) return -ENOENT;
    /* /tmp is everyone's: a directory another user made could hold a fake broker */
    if (!S_ISDIR(st.st_mode) || st.st_uid != uid || (st.st_mode & 022)) return -EPERM;
    snprintf(out, cap, "%s/broker.sock", dir);
    return path_exists(out) ? 0 : -ENOENT;
}

int pa_client_connect(const char *path, pa_client_t **out) {
    if (!out) return -EINVAL;
    *out = NULL;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char chosen[PATH_MAX];
    if (!path) {
        int rc = default_socket_path(chosen, sizeof chosen);
        if (rc) return rc;
        path = chosen;
    }
    size_t len = strlen(path);
    if (len == 0) return -EINVAL;
    if (len >= sizeof addr.sun_path) return -ENAMETOOLONG;
    memcpy(addr.sun_path, path, len + 1);

    pa_client_t *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    c->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        int rc = -errno;
        free(c);
        return rc;
    }
    int rc;
    do {
        rc = connect(c->fd, (const struct sockaddr *)&addr, sizeof addr);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        rc = -errno;
        close(c->fd);
        free(c);
        return rc;
    }
    if ((rc = pthread_mutex_init(&c->lock, NULL))) {
        close(c->fd);
        free(c);
        return -rc;
    }
    c->owner_pid = getpid();
    c->next_id = 1;
    *out = c;
    return 0;
}

int pa_client_fd(const pa_client_t *client) { return client ? client->fd : -EINVAL; }

int pa_client_last_error(pa_client_t *client, pa_client_error_t *out) {
    if (!client || !out) return -EINVAL;
    if (getpid() != client->owner_pid) return -ECHILD; /* the mutex may be a parent thread's */
    pthread_mutex_lock(&client->lock);
    *out = client->error;
    pthread_mutex_unlock(&client->lock);
    return 0;
}

static void unmap_all(pa_client_t *c) {
    for (size_t i = 0; i < c->nmappings; i++) munmap(c->mappings[i].addr, c->mappings[i].size);
    free(c->mappings);
    c->mappings = NULL;
    c->nmappings = c->mappings_capacity = 0;
}

void pa_client_close(pa_client_t *client) {
    if (!client) return;
    if (getpid() != client->owner_pid) {
        /* A forked child's copy: the mutex may have been held by a parent thread at the
         * fork (it would never be unlocked here), so neither lock nor destroy it; the
         * child is the only user of its copy. No "bye": the socket is the parent's too. */
        close(client->fd);
        unmap_all(client);
        free(client);
        return;
    }
    pthread_mutex_lock(&client->lock);
    if (!client->broken) {
        /* "bye", and a short wait for its answer so the broker has read it before the
         * hang-up; either way closing the socket releases the connection's holdings. */
        pa__jw_t w;
        request_begin(client, &w, "bye");
        pa__jw_object_end(&w);
        pa__jw_object_end(&w);
        size_t len;
        if (pa__jw_finish(&w, &len) == 0 && send(client->fd, client->send_buf, len, MSG_NOSIGNAL) >= 0) {
            struct pollfd pfd = {.fd = client->fd, .events = POLLIN};
            if (poll(&pfd, 1, BYE_WAIT_MS) > 0 && (pfd.revents & POLLIN)) {
                size_t n, nfds;
                int fds[PA_CLIENT_MAX_FDS];
                if (receive(client, &n, fds, &nfds) == 0) close_fds(fds, nfds);
            }
        }
    }
    close(client->fd);
    unmap_all(client);
    pthread_mutex_unlock(&client->lock);
    pthread_mutex_destroy(&client->lock);
    free(client);
}

/* ---- operations ---- */

int pa_client_hello(pa_client_t *client, const char *name, pa_client_hello_t *out) {
    int rc = enter(client);
    if (rc) return rc;
    pa__jw_t w;
    request_begin(client, &w, "hello");
    if (name) {
        pa__jw_key(&w, "client");
        pa__jw_string(&w, name);
    }
    answer_t a;
    if ((rc = round_trip(client, &w, 0, &a))) return leave(client, rc);
    const pa__json_doc_t *d = &a.doc;
    const pa__json_node_t *versions = pa__json_get(d, a.result, "versions");
    bool v1 = false;
    for (size_t i = 0; versions && versions->type == PA__JSON_ARRAY && i < versions->count; i++) {
        uint64_t v;
        if (pa__json_u64(pa__json_at(d, versions, i), &v) == 0 && v == PA_CLIENT_PROTOCOL_VERSION) v1 = true;
    }
    if (!versions) {
        rc = bad_result(client, "\"versions\"");
    } else if (!v1) {
        rc = -EPROTONOSUPPORT;
        set_error(client, rc, "", "%s", "the broker does not speak protocol version 1");
    } else if (out) {
        memset(out, 0, sizeof *out);
        const pa__json_node_t *peer = pa__json_get(d, a.result, "peer");
        int64_t pid, uid, ppid, puid, pgid;
        if (copy_string(pa__json_get(d, a.result, "server"), out->server, sizeof out->server) ||
            pa__json_i64(pa__json_get(d, a.result, "pid"), &pid) ||
            pa__json_i64(pa__json_get(d, a.result, "uid"), &uid) ||
            pa__json_i64(pa__json_get(d, peer, "pid"), &ppid) ||
            pa__json_i64(pa__json_get(d, peer, "uid"), &puid) ||
            pa__json_i64(pa__json_get(d, peer, "gid"), &pgid)) {
            rc = bad_result(client, "\"server\", \"pid\", \"uid\" or \"peer\"");
        } else {
            out->server_pid = (pid_t)pid;
            out->server_uid = (uid_t)uid;
            out->peer_pid = (pid_t)ppid;
            out->peer_uid = (uid_t)puid;
            out->peer_gid = (gid_t)pgid;
        }
    }
    answer_close(&a);
    return leave(client, rc);
}

void pa_client_request_options_init(pa_client_request_options_t *options) {
    if (!options) return;
    options->confidence = NAN;
    options->priority = NAN;
    options->deadline = NAN;
    options->target_application = NULL;
    options->request_id = NULL;
}

/* request_preallocation (allocates now, answers the allocation) and submit (queues it,
 * answers its id) take the same arguments. */
static int send_request(pa_client_t *client, const char *op, const char *resource_type, double amount,
                        double duration, const pa_client_request_options_t *options, uint64_t *allocation_id) {
    int rc = enter(client);
    if (rc) return rc;
    if (!resource_type || !allocation_id) return invalid(client, "resource_type and allocation_id may not be NULL");
    if (!isfinite(amount)) return invalid(client, "amount must be a finite number");
    pa__jw_t w;
    request_begin(client, &w, op);
    pa__jw_key(&w, "resource_type");
    pa__jw_string(&w, resource_type);
    pa__jw_key(&w, "predicted_need");
    pa__jw_double(&w, amount);
    if (isfinite(duration) && duration > 0) {
        pa__jw_key(&w, "duration");
        pa__jw_double(&w, duration);
    }
    if (options) {
        if (!isnan(options->confidence)) {
            pa__jw_key(&w, "confidence");
            pa__jw_double(&w, options->confidence);
        }
        if (!isnan(options->priority)) {
            pa__jw_key(&w, "priority");
            pa__jw_double(&w, options->priority);
        }
        if (!isnan(options->deadline)) {
            pa__jw_key(&w, "deadline");
            pa__jw_double(&w, options->deadline);
        }
        if (options->request_id) {
            pa__jw_key(&w, "request_id");
            pa__jw_string(&w, options->request_id);
        }
        if (options->target_application) {
            pa__jw_key(&w, "metadata");
            pa__jw_object_begin(&w);
            pa__jw_key(&w, "target_application");
            pa__jw_string(&w, options->target_application);
            pa__jw_object_end(&w);
        }
    }
    answer_t a;
    if ((rc = round_trip(client, &w, 0, &a))) return leave(client, rc);
    if (pa__json_u64(pa__json_get(&a.doc, a.result, "allocation_id"), allocation_id)) {
        rc = bad_result(client, "an integer \"allocation_id\"");
    } else {
        /* request_preallocation answers the allocation: "failed" is an answer, not an
         * error, in the protocol; to a C caller it is a failed call (the id still set) */
        const pa__json_node_t *status = pa__json_get(&a.doc, a.result, "status");
        if (status && status->type == PA__JSON_STRING && strcmp(status->str, "failed") == 0) {
            const pa__json_node_t *reason = pa__json_get(&a.doc, a.result, "failure_reason");
            rc = -EIO;
            set_error(client, rc, "", "allocation %" PRIu64 " failed: %s", *allocation_id,
                      reason && reason->type == PA__JSON_STRING ? reason->str : "(no reason given)");
        }
    }
    answer_close(&a);
    return leave(client, rc);
}

int pa_client_request(pa_client_t *client, const char *resource_type, double amount, double duration,
                      const pa_client_request_options_t *options, uint64_t *allocation_id) {
    return send_request(client, "request_preallocation", resource_type, amount, duration, options, allocation_id);
}

int pa_client_submit(pa_client_t *client, const char *resource_type, double amount, double duration,
                     const pa_client_request_options_t *options, uint64_t *allocation_id) {
    return send_request(client, "submit", resource_type, amount, duration, options, allocation_id);
}

int pa_client_request_memory(pa_client_t *client, double mib, double duration, uint64_t *allocation_id) {
    return pa_client_request(client, "memory", mib, duration, NULL, allocation_id);
}

int pa_client_wait_ready(pa_client_t *client, const uint64_t *allocation_ids, size_t n, double timeout,
                         bool *ready) {
    int rc = enter(client);
    if (rc) return rc;
    if ((!allocation_ids && n) || !ready) return invalid(client, "allocation_ids (n > 0) and ready may not be NULL");
    pa__jw_t w;
    request_begin(client, &w, "wait_ready");
    pa__jw_key(&w, "allocation_ids");
    pa__jw_array_begin(&w);
    for (size_t i = 0; i < n; i++) pa__jw_u64(&w, allocation_ids[i]);
    pa__jw_array_end(&w);
    if (isfinite(timeout) && timeout >= 0) {
        pa__jw_key(&w, "timeout");
        pa__jw_double(&w, timeout);
    }
    answer_t a;
    if ((rc = round_trip(client, &w, 0, &a))) return leave(client, rc);
    if (pa__json_bool(pa__json_get(&a.doc, a.result, "ready"), ready)) rc = bad_result(client, "a boolean \"ready\"");
    answer_close(&a);
    return leave(client, rc);
}

static int remember_mapping(pa_client_t *c, uint64_t allocation_id, void *addr, size_t size) {
    if (c->nmappings == c->mappings_capacity) {
        size_t cap = c->mappings_capacity ? c->mappings_capacity * 2 : 8;
        mapping_t *m = realloc(c->mappings, cap * sizeof *m);
        if (!m) return -ENOMEM;
        c->mappings = m;
        c->mappings_capacity = cap;
    }
    c->mappings[c->nmappings++] = (mapping_t){allocation_id, addr, size};
    return 0;
}

/* Maps the MEMORY claim's memfd (a->fds[0]) after checking it is what the protocol says. */
static int map_memory(pa_client_t *c, answer_t *a, uint64_t allocation_id, pa_client_claim_t *out) {
    const pa__json_node_t *memory = pa__json_get(&a->doc, a->result, "memory");
    uint64_t size, offset = 0;
    if (pa__json_u64(pa__json_get(&a->doc, memory, "size"), &size)) return bad_result(c, "\"memory\": {\"size\"}");
    int rc = pa__json_u64(pa__json_get(&a->doc, memory, "offset"), &offset);
    if (rc && rc != -ENOENT) return bad_result(c, "an integer \"memory\": {\"offset\"}");
    if (a->nfds != 1) {
        set_error(c, -EPROTO, "", "a MEMORY claim came with %zu descriptors, not 1", a->nfds);
        return -EPROTO;
    }
    int fd = a->fds[0];
    long page = sysconf(_SC_PAGESIZE);
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        set_error(c, -EPROTO, "", "%s", "the MEMORY claim's descriptor is not a memfd sealed against shrinking");
        return -EPROTO;
    }
    if (fstat(fd, &st) != 0 || size == 0 || size > SIZE_MAX || offset % (uint64_t)page ||
        offset > (uint64_t)st.st_size || size > (uint64_t)st.st_size - offset) {
        set_error(c, -EPROTO, "", "the MEMORY claim's size %" PRIu64 " at offset %" PRIu64
                  " does not fit its memfd", size, offset);
        return -EPROTO;
    }
    void *addr = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    if (addr == MAP_FAILED) {
        rc = -errno;
        set_error(c, rc, "", "mmap of the MEMORY claim: %s", strerror(-rc));
        return rc;
    }
    if ((rc = remember_mapping(c, allocation_id, addr, (size_t)size))) {
        munmap(addr, (size_t)size);
        set_error(c, rc, "", "%s", "no memory to record the mapping");
        return rc;
    }
    /* the mapping holds the pages now; answer_close closes the descriptor */
    out->addr = addr;
    out->size = (size_t)size;
    return 0;
}

/* Fills *out from a claim or acquire answer; maps MEMORY. claimed (nullable): the id a
 * claim asked for, which the answer must carry — a mapping is remembered under the
 * answer's id, so one of another id would outlive pa_client_release of the asked one. */
static int read_claim(pa_client_t *c, answer_t *a, const uint64_t *claimed, pa_client_claim_t *out) {
    memset(out, 0, sizeof *out);
    const bool acquire = claimed == NULL;
    const pa__json_doc_t *d = &a->doc;
    if (!a->result || a->result->type != PA__JSON_OBJECT) return bad_result(c, "an allocation object");
    if (pa__json_u64(pa__json_get(d, a->result, "allocation_id"), &out->allocation_id))
        return bad_result(c, "an integer \"allocation_id\"");
    if (claimed && out->allocation_id != *claimed) {
        set_error(c, -EPROTO, "", "the broker answered a claim of allocation %" PRIu64 " with allocation %" PRIu64,
                  *claimed, out->allocation_id);
        return -EPROTO;
    }
    const pa__json_node_t *type = pa__json_get(d, a->result, "resource_type");
    if (!type || type->type != PA__JSON_STRING || type->count >= sizeof out->resource_type)
        return bad_result(c, "a \"resource_type\"");
    memcpy(out->resource_type, type->str, type->count + 1);
    double amount;
    if (pa__json_double(pa__json_get(d, a->result, "amount"), &amount) == 0) out->amount = amount;
    if (acquire && pa__json_bool(pa__json_get(d, a->result, "preallocated"), &out->preallocated))
        return bad_result(c, "a boolean \"preallocated\"");
    if (strcmp(out->resource_type, "memory") == 0) return map_memory(c, a, out->allocation_id, out);
    if (a->nfds) {
        set_error(c, -EPROTO, "", "a %s claim came with %zu descriptors", out->resource_type, a->nfds);
        return -EPROTO;
    }
    if (strcmp(out->resource_type, "cpu") == 0) {
        const pa__json_node_t *cores = pa__json_get(d, pa__json_get(d, a->result, "cpu"), "cores");
        if (!cores || cores->type != PA__JSON_ARRAY) return bad_result(c, "\"cpu\": {\"cores\"}");
        const pa__json_node_t *core = cores + 1;
        for (uint32_t i = 0; i < cores->count; i++, core = pa__json_next(core)) {
            int64_t v;
            if (pa__json_i64(core, &v) || v < 0 || v > INT_MAX) return bad_result(c, "integer cores");
            if (i < PA_CLIENT_MAX_CORES) out->cores[i] = (int)v;
        }
        out->ncores = cores->count;
    }
    return 0;
}

/* A claim; with expected_type (non-NULL) the broker refuses an allocation of another
 * type (WrongResourceType: -EMEDIUMTYPE) before claiming anything. */
static int claim_as(pa_client_t *client, uint64_t allocation_id, pid_t target_pid, const char *expected_type,
                    pa_client_claim_t *out) {
    int rc = enter(client);
    if (rc) return rc;
    if (!out) return invalid(client, "out may not be NULL");
    if (target_pid < 0) return invalid(client, "target_pid must be 0 or a pid");
    pa__jw_t w;
    request_begin(client, &w, "claim");
    pa__jw_key(&w, "allocation_id");
    pa__jw_u64(&w, allocation_id);
    if (target_pid) {
        pa__jw_key(&w, "target_process_id");
        pa__jw_i64(&w, target_pid);
    }
    if (expected_type) {
        pa__jw_key(&w, "resource_type");
        pa__jw_string(&w, expected_type);
    }
    answer_t a;
    if ((rc = round_trip(client, &w, 1, &a))) return leave(client, rc);
    rc = read_claim(client, &a, &allocation_id, out);
    answer_close(&a);
    return leave(client, rc);
}

int pa_client_claim(pa_client_t *client, uint64_t allocation_id, pid_t target_pid, pa_client_claim_t *out) {
    return claim_as(client, allocation_id, target_pid, NULL, out);
}

/* A typed claim's answer of another type (a broker that did not check the type it was
 * sent): -EMEDIUMTYPE, and the claim stands at the broker. */
static int answered_another_type(pa_client_t *client, uint64_t allocation_id, const pa_client_claim_t *claim,
                                 const char *expected) {
    pthread_mutex_lock(&client->lock);
    set_error(client, -EMEDIUMTYPE, "", "allocation %" PRIu64 " is %s, not %s", allocation_id,
              claim->resource_type, expected);
    pthread_mutex_unlock(&client->lock);
    return -EMEDIUMTYPE;
}

int pa_client_claim_memory(pa_client_t *client, uint64_t allocation_id, void **addr, size_t *size) {
    if (!addr || !size) {
        int rc = enter(client);
        return rc ? rc : invalid(client, "addr and size may not be NULL");
    }
    pa_client_claim_t claim;
    int rc = claim_as(client, allocation_id, 0, "memory", &claim);
    if (rc) return rc;
    if (!claim.addr) return answered_another_type(client, allocation_id, &claim, "memory");
    *addr = claim.addr;
    *size = claim.size;
    return 0;
}

int pa_client_claim_cpu(pa_client_t *client, uint64_t allocation_id, int *cores, size_t max, size_t *ncores) {
    if (!cores && max) {
        int rc = enter(client);
        return rc ? rc : invalid(client, "cores may be NULL only when max is 0");
    }
    pa_client_claim_t claim;
    int rc = claim_as(client, allocation_id, 0, "cpu", &claim);
    if (rc) return rc;
    if (strcmp(claim.resource_type, "cpu") != 0) return answered_another_type(client, allocation_id, &claim, "cpu");
    size_t have = claim.ncores < PA_CLIENT_MAX_CORES ? claim.ncores : PA_CLIENT_MAX_CORES;
    for (size_t i = 0; i < have && i < max; i++) cores[i] = claim.cores[i];
    if (ncores) *ncores = claim.ncores;
    return 0;
}

int pa_client_acquire(pa_client_t *client, const char *resource_type, double amount,
                      const char *target_application, pa_client_claim_t *out) {
    int rc = enter(client);
    if (rc) return rc;
    if (!resource_type || !out) return invalid(client, "resource_type and out may not be NULL");
    if (!isfinite(amount)) return invalid(client, "amount must be a finite number");
    pa__jw_t w;
    request_begin(client, &w, "acquire");
    pa__jw_key(&w, "resource_type");
    pa__jw_string(&w, resource_type);
    pa__jw_key(&w, "amount");
    pa__jw_double(&w, amount);
    if (target_application) {
        pa__jw_key(&w, "target_application");
        pa__jw_string(&w, target_application);
    }
    answer_t a;
    if ((rc = round_trip(client, &w, 1, &a))) return leave(client, rc);
    rc = read_claim(client, &a, NULL, out);
    answer_close(&a);
    return leave(client, rc);
}

int pa_client_acquire_memory(pa_client_t *client, double mib, void **addr, size_t *size, uint64_t *allocation_id,
                             bool *preallocated) {
    if (!addr || !size || !allocation_id) {
        int rc = enter(client);
        return rc ? rc : invalid(client, "addr, size and allocation_id may not be NULL");
    }
    pa_client_claim_t claim;
    int rc = pa_client_acquire(client, "memory", mib, NULL, &claim);
    if (rc) return rc;
    if (!claim.addr) {
        pthread_mutex_lock(&client->lock);
        set_error(client, -EPROTO, "", "%s", "a memory acquire answered without memory");
        pthread_mutex_unlock(&client->lock);
        return -EPROTO;
    }
    *addr = claim.addr;
    *size = claim.size;
    *allocation_id = claim.allocation_id;
    if (preallocated) *preallocated = claim.preallocated;
    return 0;
}

int pa_client_release(pa_client_t *client, uint64_t allocation_id, bool *released) {
    int rc = enter(client);
    if (rc) return rc;
    for (size_t i = 0; i < client->nmappings;) {
        if (client->mappings[i].allocation_id == allocation_id) {
            munmap(client->mappings[i].addr, client->mappings[i].size);
            client->mappings[i] = client->mappings[--client->nmappings];
        } else {
            i++;
        }
    }
    pa__jw_t w;
    request_begin(client, &w, "release_allocation");
    pa__jw_key(&w, "allocation_id");
    pa__jw_u64(&w, allocation_id);
    answer_t a;
    if ((rc = round_trip(client, &w, 0, &a))) return leave(client, rc);
    bool value;
    if (pa__json_bool(pa__json_get(&a.doc, a.result, "released"), &value)) rc = bad_result(client, "a boolean \"released\"");
    else if (released) *released = value;
    answer_close(&a);
    return leave(client, rc);
}
