/*
 * bench_client.c — what the C broker client itself adds to a call, against the floor of
 * any client: the bounded encoder writing a claim request plus the strict reader parsing
 * a claim answer of the broker's shape (src/native/client_json.h), next to one round trip
 * of the same bytes over a SOCK_SEQPACKET socketpair (sendmsg + recvmsg each way, a thread
 * echoing), in the same run. The broker's own time is measured against the Python client
 * in tests/test_c_client.py (-k bench).
 *
 *   build/bench/bench_client [--iterations N] [--reps R]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench_util.h"
#include "client_json.h"

static const char ANSWER[] =
    "{\"v\": 1, \"id\": 123456, \"ok\": true, \"result\": {\"allocation_id\": 219043332096, \"request_id\": 3, "
    "\"resource_type\": \"memory\", \"amount\": 1.0, \"requested_amount\": 1.0, \"allocated_amount\": 1.0, "
    "\"actual_usage\": null, \"status\": \"active\", \"allocated_at\": 13541.512309, \"expires_at\": null, "
    "\"details\": {\"populated\": true, \"populate_method\": \"madvise\", \"locked\": false, "
    "\"lock_error\": \"Operation not permitted\", \"huge_pages\": false, \"huge_pages_error\": null, "
    "\"thp_mode\": \"never\", \"shareable\": true, \"fd\": 14}, \"feedback\": null, \"failure_reason\": null, "
    "\"owner_pid\": 18463, \"owner_uid\": 0, \"preallocated\": true, \"memory\": {\"size\": 1048576, "
    "\"offset\": 0}}, \"fds\": 1}";

static volatile uint64_t sink;

static double codec_once(long iterations) {
    char buf[1024];
    double t0 = now_s();
    for (long i = 0; i < iterations; i++) {
        pa__jw_t w;
        pa__jw_init(&w, buf, sizeof buf);
        pa__jw_object_begin(&w);
        pa__jw_key(&w, "v");
        pa__jw_u64(&w, 1);
        pa__jw_key(&w, "id");
        pa__jw_u64(&w, (uint64_t)i);
        pa__jw_key(&w, "op");
        pa__jw_string(&w, "claim");
        pa__jw_key(&w, "args");
        pa__jw_object_begin(&w);
        pa__jw_key(&w, "allocation_id");
        pa__jw_u64(&w, 219043332096u);
        pa__jw_object_end(&w);
        pa__jw_object_end(&w);
        size_t len;
        if (pa__jw_finish(&w, &len)) abort();
        pa__json_doc_t doc;
        if (pa__json_parse(ANSWER, sizeof ANSWER - 1, &doc, NULL)) abort();
        const pa__json_node_t *result = pa__json_get(&doc, &doc.nodes[0], "result");
        uint64_t size = 0;
        pa__json_u64(pa__json_get(&doc, pa__json_get(&doc, result, "memory"), "size"), &size);
        sink += size + len;
        pa__json_doc_free(&doc);
    }
    return (now_s() - t0) / (double)iterations;
}

static void *echo(void *arg) {
    int fd = *(int *)arg;
    char buf[65537];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf, 0)) > 0)
        if (send(fd, ANSWER, sizeof ANSWER - 1, MSG_NOSIGNAL) < 0) break;
    return NULL;
}

static double round_trip_once(int fd, long iterations) {
    char request[128], answer[65537];
    int n = snprintf(request, sizeof request, "{\"v\":1,\"id\":1,\"op\":\"claim\",\"args\":{\"allocation_id\":5}}");
    double t0 = now_s();
    for (long i = 0; i < iterations; i++) {
        struct iovec iov = {request, (size_t)n};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        if (sendmsg(fd, &msg, MSG_NOSIGNAL) < 0) abort();
        struct iovec riov = {answer, sizeof answer};
        char control[CMSG_SPACE(4 * sizeof(int))];
        struct msghdr rmsg = {.msg_iov = &riov, .msg_iovlen = 1, .msg_control = control,
                              .msg_controllen = sizeof control};
        if (recvmsg(fd, &rmsg, MSG_CMSG_CLOEXEC) <= 0) abort();
    }
    return (now_s() - t0) / (double)iterations;
}

int main(int argc, char **argv) {
    long iterations = 20000;
    int reps = 7;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--iterations") == 0) iterations = atol(argv[i + 1]);
        else if (strcmp(argv[i], "--reps") == 0) reps = atoi(argv[i + 1]);
    }
    if (iterations < 1 || reps < 1 || reps > 64) return 2;
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair)) return 1;
    pthread_t echo_thread;
    pthread_create(&echo_thread, NULL, echo, &pair[1]);
    double codec[64], trip[64];
    for (int r = 0; r < reps; r++) { /* interleaved, so load moves both alike */
        codec[r] = codec_once(iterations);
        trip[r] = round_trip_once(pair[0], iterations);
    }
    close(pair[0]);
    pthread_join(echo_thread, NULL);
    close(pair[1]);
    double c = median(codec, reps), t = median(trip, reps);
    printf("C client, per call, median of %d x %ld (answer %zu bytes):\n", reps, iterations, sizeof ANSWER - 1);
    printf("  encode claim request + parse claim answer : %8.2f us\n", c * 1e6);
    printf("  SEQPACKET round trip of the same bytes    : %8.2f us\n", t * 1e6);
    printf("  codec / round trip                        : %8.2f\n", c / t);
    return 0;
}
