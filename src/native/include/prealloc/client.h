/*
 * prealloc/client.h — the C client of the machine broker (`prealloc serve`), so a C or
 * C++ host can reserve and claim resources from the one broker that owns the machine's
 * reservations, as prealloc.client.Client does in Python.
 *
 * Design
 * ------
 * The wire protocol is docs/protocol.md, version 1: one Unix socket of type
 * SOCK_SEQPACKET, one UTF-8 JSON object per message (at most PA_CLIENT_MAX_MESSAGE bytes),
 * descriptors by SCM_RIGHTS (at most PA_CLIENT_MAX_FDS per message). Every call here is
 * one request and its answer: the client writes {"v":1,"id":N,"op":...,"args":{...}} with
 * a bounded encoder into a fixed buffer, sends it in one sendmsg, and reads the answer
 * with one recvmsg into a buffer one byte larger than the limit (an answer that fills it
 * or sets MSG_TRUNC is over the limit). The answer is read by a strict JSON reader of our
 * own (src/native/client_json.h: RFC 8259 exactly, depth-limited, never past the
 * message): the core takes no dependency.
 *
 * Descriptors: every descriptor that arrives is counted against the answer's "fds" and
 * what the operation expects; any other one — too many, an answer that expects none, an
 * event's, a truncated control message (MSG_CTRUNC: the kernel dropped some, we close
 * the rest) — is closed at once and the call fails -EPROTO. Received descriptors are
 * close-on-exec (MSG_CMSG_CLOEXEC).
 *
 * Memory claims cross the process boundary without a copy: the broker's reservation is
 * a memfd sealed against shrinking; pa_client_claim_memory checks the seal and the size
 * (fstat), maps it MAP_SHARED read-write, and closes the descriptor — the mapping keeps
 * the pages, which are the broker's own (populated, locked where the broker could). The
 * client remembers each mapping by allocation id: pa_client_release and pa_client_close
 * unmap it. A CPU claim pins the caller's process (the broker does it, checked by pidfd)
 * and reports the cores.
 *
 * Errors: every function returns 0 or a negative errno. A broker's error answer maps to
 * an errno (below) and its type and message are kept for pa_client_last_error:
 *   ValueError, TypeError -> -EINVAL        KeyError -> -ENOENT
 *   PermissionError -> -EPERM               AllocationError -> -EIO
 *   InsufficientResources -> -ENOMEM        QuotaExceeded -> -EDQUOT
 *   Timeout -> -ETIMEDOUT                   RateLimited -> -EAGAIN
 *   ProtocolError -> -EPROTO                VersionError -> -EPROTONOSUPPORT
 *   Closed -> -ESHUTDOWN                    any other type -> -EREMOTEIO
 * Local failures: -ENOENT (no socket found), -ENAMETOOLONG (path longer than sun_path),
 * -ECONNREFUSED and the other connect errors, -EPROTO (an answer that breaks the
 * protocol: not JSON, wrong version or id, missing fields, unexpected descriptors),
 * -EMSGSIZE (an answer or a request over PA_CLIENT_MAX_MESSAGE), -ECONNRESET (the broker
 * closed the connection), -ECHILD (a call in a child process on a client its parent
 * opened: the socket is shared, a request there would cut into the parent's
 * conversation). After -EPROTO, -EMSGSIZE on an answer, or -ECONNRESET the connection is
 * out of step for good: every later call answers -ENOTCONN; close the client.
 *
 * Blocking: calls block until the broker answers (pa_client_wait_ready for up to its
 * timeout, the broker's side). There is no client-side timeout; a host that needs one
 * runs the client on a thread of its own.
 *
 * Thread safety: a client is safe to share between threads. One mutex per client is held
 * for each whole request/answer round trip, so calls on one client are serialised (a long
 * pa_client_wait_ready holds the others back); use one client per thread for parallel
 * calls. pa_client_last_error copies the error of the last call that finished on the
 * client, whichever thread made it. pa_client_close must not race other calls on it.
 *
 * fork: a child must not use its parent's client (every call, pa_client_last_error
 * included, answers -ECHILD); pa_client_close in the child closes its copy of the socket
 * and unmaps its copies of the mappings without telling the broker and without touching
 * the mutex (the parent's connection and holdings stay).
 *
 * Cost: one sendmsg and one recvmsg per call (plus the events skipped), O(message) to
 * encode and read, one malloc'ed document per answer; the client holds two buffers of
 * PA_CLIENT_MAX_MESSAGE + 1 bytes and one record per live mapping (release: O(mappings)).
 * Progress: blocking (a mutex and the broker's answer).
 *
 * Signals: the client sends with MSG_NOSIGNAL (a dead broker is -ECONNRESET / -EPIPE, not
 * SIGPIPE) and retries calls interrupted by a signal (EINTR).
 *
 * NULL: as everywhere in the core, a NULL client or needed out pointer answers -EINVAL;
 * parameters marked "nullable" may be NULL. pa_client_close(NULL) does nothing.
 *
 * Link: part of the static core (-lprealloc_core -lpthread).
 */
#ifndef PREALLOC_CLIENT_H
#define PREALLOC_CLIENT_H

#include <sys/types.h> /* pid_t */

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PA_CLIENT_PROTOCOL_VERSION 1
#define PA_CLIENT_MAX_MESSAGE 65536
#define PA_CLIENT_MAX_FDS 4
/* The socket paths of the protocol's default order (docs/protocol.md, "Where the socket is") */
#define PA_CLIENT_SOCKET_ENV "PREALLOC_SOCKET"
#define PA_CLIENT_SYSTEM_SOCKET "/run/prealloc-broker/broker.sock"

typedef struct pa_client pa_client_t; /* opaque */

typedef struct pa_client_error {
    int code;          /* the call's return value (0: the last call succeeded) */
    char type[32];     /* the broker's error type ("KeyError", ...); "" for a local failure */
    char message[256]; /* the broker's message, or what failed locally; truncated to fit */
} pa_client_error_t;

/* Connects to the broker at path, or, for path NULL, at the first socket that exists of:
 * $PREALLOC_SOCKET, PA_CLIENT_SYSTEM_SOCKET, $XDG_RUNTIME_DIR/prealloc-broker.sock,
 * /tmp/prealloc-broker-<euid>/broker.sock (the last only when that directory is a real
 * directory owned by the caller's effective uid and writable by no one else: -EPERM
 * otherwise, as another user could have planted it). Environment variables are read with
 * secure_getenv. -ENOENT when none exists; -ENOMEM; the errno of socket/connect.
 * The client is closed with pa_client_close. */
PA_API int pa_client_connect(const char *path, pa_client_t **out);

/* Says "bye" (best effort), closes the connection — the broker releases every
 * allocation of the connection — and unmaps every mapping claimed through the client:
 * pointers into them are invalid afterwards. Frees the client. NULL does nothing. */
PA_API void pa_client_close(pa_client_t *client);

/* The connection's descriptor (for poll or diagnostics; never read or write it). */
PA_API int pa_client_fd(const pa_client_t *client);

/* Copies the last finished call's error (code 0 and empty strings after a success). */
PA_API int pa_client_last_error(pa_client_t *client, pa_client_error_t *out);

typedef struct pa_client_hello {
    char server[64];   /* "prealloc X.Y" */
    pid_t server_pid;  /* the broker's pid, as it says */
    uid_t server_uid;
    pid_t peer_pid;    /* what SO_PEERCRED told the broker about us */
    uid_t peer_uid;
    gid_t peer_gid;
} pa_client_hello_t;

/* The "hello" operation: checks that the broker speaks version 1 (-EPROTONOSUPPORT
 * otherwise) and fills *out (nullable). name (nullable) names this client in the
 * broker's logs. */
PA_API int pa_client_hello(pa_client_t *client, const char *name, pa_client_hello_t *out);

/* Optional fields of a request; pa_client_request_options_init sets them all absent. */
typedef struct pa_client_request_options {
    double confidence;              /* 0..1; NaN: absent (the broker's default, 1.0) */
    double priority;                /* NaN: absent (0) */
    double deadline;                /* CLOCK_MONOTONIC seconds; NaN: none */
    const char *target_application; /* nullable */
    const char *request_id;         /* nullable: the broker assigns one */
} pa_client_request_options_t;

PA_API void pa_client_request_options_init(pa_client_request_options_t *options);

/* "request_preallocation": the broker reserves amount of resource_type ("memory", "cpu",
 * "gpu", "network_bandwidth", "disk_io", "cache_space", "custom"; the unit is the type's:
 * MEMORY in MiB, CPU in cores) for duration seconds (NaN or <= 0: until released) ahead
 * of need, now, before it answers (as in-process). *allocation_id receives the broker's
 * id; options nullable. -EIO when the broker answered the allocation "failed" (then
 * *allocation_id names it and pa_client_last_error's message carries its
 * failure_reason); -EINVAL (amount not finite, resource_type NULL or not valid UTF-8; the
 * broker's ValueError for anything it refuses). */
PA_API int pa_client_request(pa_client_t *client, const char *resource_type, double amount, double duration,
                             const pa_client_request_options_t *options, uint64_t *allocation_id);
/* "submit": the queued form of pa_client_request: the broker answers at once with the
 * id of a PENDING allocation its worker reserves later; pa_client_wait_ready, then claim. */
PA_API int pa_client_submit(pa_client_t *client, const char *resource_type, double amount, double duration,
                            const pa_client_request_options_t *options, uint64_t *allocation_id);
/* pa_client_request(client, "memory", mib, duration, NULL, allocation_id) */
PA_API int pa_client_request_memory(pa_client_t *client, double mib, double duration, uint64_t *allocation_id);

/* "wait_ready": waits until every one of the n allocations is ready (allocated, or
 * finally failed) or timeout seconds pass (NaN or < 0: no timeout). *ready receives the
 * broker's answer. */
PA_API int pa_client_wait_ready(pa_client_t *client, const uint64_t *allocation_ids, size_t n, double timeout,
                                bool *ready);

#define PA_CLIENT_MAX_CORES 64

/* What a claim gave. */
typedef struct pa_client_claim {
    uint64_t allocation_id;
    char resource_type[24]; /* the broker's lower-case value: "memory", "cpu", ... */
    double amount;
    bool preallocated;      /* acquire only: served from a reservation made ahead */
    /* MEMORY: the broker's memfd mapped MAP_SHARED read-write here (released by
     * pa_client_release / pa_client_close); NULL for other types */
    void *addr;
    size_t size;
    /* CPU: the cores the broker pinned the process to (the first PA_CLIENT_MAX_CORES;
     * ncores is the full count) */
    int cores[PA_CLIENT_MAX_CORES];
    size_t ncores;
} pa_client_claim_t;

/* "claim": takes allocation_id's resource for the caller (target_pid 0: the calling
 * process; another pid is the broker's business to check). A MEMORY claim arrives as a
 * descriptor and is mapped (see the design); a descriptor that is not a memfd sealed
 * with F_SEAL_SHRINK, or smaller than the size the answer gives, fails -EPROTO (the claim
 * stands at the broker: release it); so does an answer for another allocation than
 * allocation_id (nothing is mapped). */
PA_API int pa_client_claim(pa_client_t *client, uint64_t allocation_id, pid_t target_pid, pa_client_claim_t *out);
/* pa_client_claim for MEMORY: *addr and *size the mapping. An allocation of another type
 * fails -EMEDIUMTYPE and is left as it was (the broker checks the type before claiming). */
PA_API int pa_client_claim_memory(pa_client_t *client, uint64_t allocation_id, void **addr, size_t *size);
/* pa_client_claim for CPU (the broker pins the calling process): the first max cores
 * into cores (nullable when max is 0), *ncores (nullable) the count. Another type fails
 * -EMEDIUMTYPE and is left as it was (not claimed, nothing pinned). */
PA_API int pa_client_claim_cpu(pa_client_t *client, uint64_t allocation_id, int *cores, size_t max,
                               size_t *ncores);

/* "acquire": claims amount of resource_type at once, from a reservation made ahead when
 * one fits (out->preallocated), else reserved on the spot. target_application
 * nullable. */
PA_API int pa_client_acquire(pa_client_t *client, const char *resource_type, double amount,
                             const char *target_application, pa_client_claim_t *out);
/* pa_client_acquire of mib MiB of MEMORY, mapped: *addr, *size, *allocation_id;
 * preallocated nullable. */
PA_API int pa_client_acquire_memory(pa_client_t *client, double mib, void **addr, size_t *size,
                                    uint64_t *allocation_id, bool *preallocated);

/* "release_allocation": unmaps what this client mapped for allocation_id (always: the
 * caller is done with it, whatever the broker answers), then tells the broker.
 * *released (nullable) receives its answer. -ENOENT: not the caller's, or unknown. */
PA_API int pa_client_release(pa_client_t *client, uint64_t allocation_id, bool *released);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_CLIENT_H */
