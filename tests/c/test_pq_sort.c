/*
 * test_pq_sort.c — the batch push's key sort (pq.c, sort_keys: an MSD radix sort that
 * skips the digits its keys agree on) and key encoding (make_keys), white-box: this file
 * compiles src/native/pq.c itself (public functions renamed, as test_pq_finger.c does).
 *
 * Each key set is sorted by sort_keys and by qsort with a plain four-word comparison, and
 * the two must be equal word for word; make_keys must encode each item as the reference
 * encoding below does (order-preserving words with -0.0 as +0.0, "no deadline" for NaN
 * and +inf). Key sets are adversarial for
 * a radix sort that skips constant digits: all equal (the arrival word alone orders
 * them), all distinct, NaN / +inf deadlines among finite ones, -0.0 and +0.0 in every
 * field, negative and infinite priorities, subnormals, keys that differ only in one bit
 * (at digit boundaries, word boundaries, the lowest bit), keys that share long prefixes,
 * sorted and reversed input, at sizes around the insertion-sort leaf (16), a chunk (256)
 * and a group (65 536). Then the same key sets go through pa_pq_push_many and come out of
 * pop_items in key order, equal keys in input order (the arrival contract). The blank
 * nodes of a batch are ordered by address within each height (order_nodes; its
 * sort_by_address checked against qsort), the k-th key still getting a node of the height
 * drawn for it, so a queue filled again from recycled nodes holds each batch in a few
 * ascending streams of memory and its towers stay independent of the addresses.
 */
#define _GNU_SOURCE
#include "pq_whitebox.h"

#include <float.h>

#include "pa_test.h"

/* The key encoding written the plain way, with branches: the oracle for pq.c's
 * branch-free enc_asc / encode_key. */
static uint64_t ref_enc_asc(double d) {
    if (d == 0.0) d = 0.0; /* -0.0 and +0.0 are the same priority */
    uint64_t u = pa__double_bits(d);
    return (u >> 63) ? ~u : u | (1ull << 63);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double from_bits(uint64_t u) { return pa__bits_double(u); }
/* a valid priority / confidence from raw bits: any double but NaN */
static double not_nan(uint64_t u) {
    double d = from_bits(u);
    return isnan(d) ? from_bits(u & ~(1ull << 62)) : d; /* exponent no longer all ones */
}
/* a valid deadline: anything but -inf (NaN and +inf are "none") */
static double valid_deadline(uint64_t u) {
    double d = from_bits(u);
    return (isinf(d) && d < 0) ? -DBL_MAX : d;
}

enum { NSETS = 15 };
static const char *set_name[NSETS] = {
    "all equal", "all distinct [0,1)", "small-integer priorities", "NaN/inf deadlines", "signed zeros",
    "negative/inf priorities", "subnormals", "one bit each (k0)", "one bit each (k1, k2)", "shared prefixes",
    "sorted", "reversed", "random bits", "two values", "sparse bits"};

/* Fills p/c/d with key set `set` of n items. */
static void make_set(int set, size_t n, double *p, double *c, double *d) {
    static const double zeros[2] = {0.0, -0.0};
    uint64_t base = rnd(), sparse = rnd() & rnd() & rnd(); /* few bits */
    for (size_t i = 0; i < n; i++) {
        uint64_t r = rnd();
        switch (set) {
        case 0: p[i] = 1.0; c[i] = 0.5; d[i] = NAN; break;
        case 1: p[i] = (double)(r >> 11) * (1.0 / 9007199254740992.0); c[i] = (double)(r & 3) * 0.25;
                d[i] = (r & 0x30) ? (double)((r >> 8) & 0xffff) : NAN; break;
        case 2: p[i] = (double)(r % 4); c[i] = 1.0; d[i] = INFINITY; break;
        case 3: p[i] = (double)(r % 3); c[i] = 0.0;
                d[i] = (r & 4) ? NAN : (r & 8) ? INFINITY : (r & 16) ? -DBL_MAX : (double)((r >> 8) % 5) - 2.0; break;
        case 4: p[i] = zeros[r & 1]; c[i] = zeros[(r >> 1) & 1]; d[i] = zeros[(r >> 2) & 1]; break;
        case 5: p[i] = (r & 1) ? -INFINITY : (r & 2) ? INFINITY : -(double)((r >> 4) % 7) - 0.5;
                c[i] = (r & 8) ? -1.0 : 1.0; d[i] = -(double)((r >> 8) % 3); break;
        case 6: p[i] = from_bits((r >> 40) & 0xff); c[i] = (r & 1) ? DBL_MIN : from_bits(1);
                d[i] = -from_bits((r >> 20) & 3); break;
        case 7: p[i] = not_nan(base ^ (1ull << (i % 64))); c[i] = 0.25; d[i] = 1.0; break;
        case 8: p[i] = 2.0; c[i] = not_nan(base ^ (1ull << (i % 64)));
                d[i] = valid_deadline(base ^ (1ull << ((i / 64) % 64))); break;
        case 9: p[i] = not_nan(base ^ ((r % 3) << (r & 63))); c[i] = not_nan(base ^ (r & 1));
                d[i] = valid_deadline(base ^ (r & 7)); break;
        case 10: p[i] = -(double)(i / 3); c[i] = 0.5; d[i] = (double)(i % 3); break;
        case 11: p[i] = (double)(i / 2); c[i] = (double)(i % 2); d[i] = -(double)i; break;
        case 12: p[i] = not_nan(r); c[i] = not_nan(rnd()); d[i] = valid_deadline(rnd()); break;
        case 13: p[i] = (r & 1) ? 1.0 : 2.0; c[i] = 0.5; d[i] = (r & 2) ? 3.0 : NAN; break;
        default: p[i] = not_nan(base ^ (r & sparse)); c[i] = not_nan(base ^ (rnd() & sparse));
                 d[i] = valid_deadline(base ^ (rnd() & sparse)); break;
        }
    }
}

static int cmp_full(const void *a, const void *b) {
    const pq_sort_key_t *x = a, *y = b;
    for (int w = 0; w < 4; w++)
        if (x->k[w] != y->k[w]) return x->k[w] < y->k[w] ? -1 : 1;
    return 0;
}

static const size_t sizes[] = {0, 1, 2, 3, 15, 16, 17, 18, 31, 32, 33, 100, 255, 256, 257, 511, 1000, 4097, 65535, 65536};
enum { NSIZES = sizeof sizes / sizeof sizes[0], MAXN = 65536 };

static void test_sort_matches_reference(void) {
    double *p = malloc(MAXN * sizeof *p), *c = malloc(MAXN * sizeof *c), *d = malloc(MAXN * sizeof *d);
    pq_sort_key_t *keys = malloc(2 * MAXN * sizeof *keys), *ref = malloc(MAXN * sizeof *ref);
    REQUIRE(p && c && d && keys && ref);
    long bad_sets = 0, bad_enc = 0, bad_diff = 0;
    uint64_t diff_seen[3] = {0, 0, 0};
    for (int set = 0; set < NSETS; set++) {
        for (size_t si = 0; si < NSIZES; si++) {
            size_t n = sizes[si];
            make_set(set, n, p, c, d);
            uint64_t ticket = 1000 + rnd() % 1000;
            uint64_t diff[3];
            make_keys(keys, n, p, c, d, ticket, diff);
            for (size_t i = 0; i < n; i++) { /* the single push's encoding */
                uint64_t k2 = (isnan(d[i]) || isinf(d[i])) ? UINT64_MAX : ref_enc_asc(d[i]);
                if (keys[i].k[0] != ~ref_enc_asc(p[i]) || keys[i].k[1] != ~ref_enc_asc(c[i]) || keys[i].k[2] != k2 ||
                    keys[i].k[3] != ticket + i)
                    bad_enc++;
            }
            memcpy(ref, keys, n * sizeof *ref);
            if (n) qsort(ref, n, sizeof *ref, cmp_full);
            for (size_t i = 0; i < n; i++) /* the diff: the bits where a key differs from the first */
                for (int w = 0; w < 3; w++) diff_seen[w] |= keys[i].k[w] ^ keys[0].k[w];
            if (memcmp(diff_seen, diff, sizeof diff) != 0) bad_diff++;
            memset(diff_seen, 0, sizeof diff_seen);
            sort_keys(keys, keys + n, n, diff);
            if (n && memcmp(keys, ref, n * sizeof *ref) != 0) {
                if (bad_sets++ < 5) fprintf(stderr, "sort differs from qsort: set '%s', n %zu\n", set_name[set], n);
            }
        }
    }
    CHECK_EQ_INT(bad_sets, 0);
    CHECK_EQ_INT(bad_enc, 0);
    CHECK_EQ_INT(bad_diff, 0);
    free(p);
    free(c);
    free(d);
    free(keys);
    free(ref);
}

/* 0.0 and -0.0 are one priority: equal keys, so arrival (input) order decides. */
static void test_signed_zero_is_one_key(void) {
    pq_sort_key_t k[2];
    double p[2] = {0.0, -0.0}, c[2] = {-0.0, 0.0}, d[2] = {-0.0, 0.0};
    uint64_t diff[3];
    make_keys(k, 2, p, c, d, 7, diff);
    CHECK(k[0].k[0] == k[1].k[0] && k[0].k[1] == k[1].k[1] && k[0].k[2] == k[1].k[2]);
    CHECK(diff[0] == 0 && diff[1] == 0 && diff[2] == 0);
}

/* Larger than a group, through the public API: pop order is key order, equal keys in input
 * order, every value once with its own key. */
static bool ordered_before(const pa_pq_item_t *a, const pa_pq_item_t *b) {
    if (a->priority != b->priority) return a->priority > b->priority;
    if (a->confidence != b->confidence) return a->confidence > b->confidence;
    if (a->deadline != b->deadline) return a->deadline < b->deadline;
    return a->arrival < b->arrival;
}
static bool same_key(const pa_pq_item_t *a, double p, double c, double d) {
    double dd = (isnan(d) || isinf(d)) ? INFINITY : d;
    return a->priority == p && a->confidence == c && a->deadline == dd;
}

static void test_push_many_order(void) {
    static const size_t pushes[] = {17, 256, 257, 65536 + 300, 2 * 65536 + 1};
    size_t maxn = 2 * 65536 + 1;
    double *p = malloc(maxn * sizeof *p), *c = malloc(maxn * sizeof *c), *d = malloc(maxn * sizeof *d);
    uint64_t *v = malloc(maxn * sizeof *v);
    pa_pq_item_t *out = malloc(maxn * sizeof *out);
    REQUIRE(p && c && d && v && out);
    long disorder = 0, wrong = 0, fifo = 0;
    for (int set = 0; set < NSETS; set++) {
        size_t n = pushes[(size_t)set % (sizeof pushes / sizeof pushes[0])];
        if (pa_stress(2) < 2 && n > 70000) n = 257; /* TSan: the small sizes only */
        make_set(set, n, p, c, d);
        for (size_t i = 0; i < n; i++) v[i] = i;
        pa_pq_t *q = NULL;
        REQUIRE(wb_pq_create(0, &q) == 0);
        size_t pushed = 0;
        CHECK_EQ_INT(wb_pq_push_many(q, n, v, p, c, d, &pushed), 0);
        CHECK_EQ_INT(pushed, n);
        ssize_t got = wb_pq_pop_items(q, out, n);
        CHECK_EQ_INT(got, (ssize_t)n);
        for (ssize_t i = 0; i < got; i++) {
            if (out[i].value >= n || !same_key(&out[i], p[out[i].value], c[out[i].value], d[out[i].value])) wrong++;
            if (i > 0 && !ordered_before(&out[i - 1], &out[i])) disorder++;
            /* equal keys: input order (values are input indexes) */
            if (i > 0 && out[i - 1].priority == out[i].priority && out[i - 1].confidence == out[i].confidence &&
                out[i - 1].deadline == out[i].deadline && out[i - 1].value > out[i].value)
                fifo++;
        }
        wb_pq_destroy(q);
    }
    CHECK_EQ_INT(disorder, 0);
    CHECK_EQ_INT(wrong, 0);
    CHECK_EQ_INT(fifo, 0);
    free(p);
    free(c);
    free(d);
    free(v);
    free(out);
}

static int cmp_ptr(const void *a, const void *b) {
    uintptr_t x = (uintptr_t) * (pq_node_t *const *)a, y = (uintptr_t) * (pq_node_t *const *)b;
    return x < y ? -1 : x > y;
}

/* sort_by_address against qsort, on real heap addresses in shuffled, ascending and
 * descending order. */
static void test_sort_by_address(void) {
    static const size_t ns[] = {0, 1, 2, 3, 5, 16, 17, 40, 255, 256, 5000};
    enum { M = 5000 };
    pq_node_t **blocks = malloc(M * sizeof *blocks), **a = malloc(M * sizeof *a), **ref = malloc(M * sizeof *ref),
              **tmp = malloc(M * sizeof *tmp);
    REQUIRE(blocks && a && ref && tmp);
    for (size_t i = 0; i < M; i++) blocks[i] = malloc(16 + 16 * (i % 7));
    long bad = 0;
    for (size_t si = 0; si < sizeof ns / sizeof ns[0]; si++) {
        for (int order = 0; order < 3; order++) {
            size_t n = ns[si];
            memcpy(a, blocks, n * sizeof *a);
            if (order == 1 && n) qsort(a, n, sizeof *a, cmp_ptr);
            for (size_t i = n; order != 1 && i > 1; i--) { /* shuffle; order 2 then reversed */
                size_t j = rnd() % i;
                pq_node_t *x = a[i - 1];
                a[i - 1] = a[j];
                a[j] = x;
            }
            if (order == 2 && n) {
                qsort(a, n, sizeof *a, cmp_ptr);
                for (size_t i = 0; i < n / 2; i++) {
                    pq_node_t *x = a[i];
                    a[i] = a[n - 1 - i];
                    a[n - 1 - i] = x;
                }
            }
            memcpy(ref, a, n * sizeof *a);
            if (n) qsort(ref, n, sizeof *ref, cmp_ptr);
            sort_by_address(a, tmp, n);
            if (n && memcmp(a, ref, n * sizeof *a) != 0) bad++;
        }
    }
    CHECK_EQ_INT(bad, 0);
    for (size_t i = 0; i < M; i++) free(blocks[i]);
    free(blocks);
    free(a);
    free(ref);
    free(tmp);
}

/* A queue filled, drained and filled again (the second fill's nodes are recycled, in the
 * order they were freed) holds each batch's nodes of each height in ascending memory
 * along level 0: a group (5000 items) and a chunk (200). Returns the number of descents
 * (a node below the previous live node of its height). */
static long level0_descents(pa_pq_t *pq) {
    long down = 0;
    pq_node_t *prev[PQ_MAX_LEVEL + 1] = {0};
    uintptr_t raw = pa__load_acquire(&pq->head->next0);
    for (pq_node_t *x = unmark(raw); x != pq->tail; raw = pa__load_acquire(&x->next0), x = unmark(raw)) {
        if (is_marked(raw)) continue; /* popped, not yet cut: an earlier fill's node */
        if (prev[x->level] && (uintptr_t)x < (uintptr_t)prev[x->level]) down++;
        prev[x->level] = x;
    }
    return down;
}

/* order_nodes gives the k-th key a node of the height drawn for it, whatever the
 * addresses: nodes whose heights cluster by address (as a cache per height and malloc's
 * size classes make them) must not come out as runs of one height along the keys (a
 * skiplist of such runs is a list). And it is a permutation, each height's nodes in
 * ascending memory. */
static void test_order_nodes_keeps_heights(void) {
    enum { N = 3000, H = 4 };
    static pq_node_t *nodes[N], *orig[N], *cls[N], *scratch[N];
    static uint8_t heights[N];
    for (size_t k = 0; k < N; k++) heights[k] = (uint8_t)(1 + rnd() % H);
    for (unsigned h = H; h >= 1; h--) /* clustered: all nodes of one height, then the next */
        for (size_t k = 0; k < N; k++)
            if (heights[k] == h) REQUIRE((nodes[k] = node_alloc(NULL, h)) != NULL);
    for (size_t k = 0; k < N / 2; k++) { /* and scrambled within a height */
        size_t j = rnd() % N;
        if (heights[j] == heights[k]) {
            pq_node_t *x = nodes[k];
            nodes[k] = nodes[j];
            nodes[j] = x;
        }
    }
    memcpy(orig, nodes, sizeof nodes);
    order_nodes(nodes, heights, cls, scratch, N);
    long wrong_height = 0, down = 0, missing = 0;
    pq_node_t *prev[H + 1] = {0};
    for (size_t k = 0; k < N; k++) {
        if (nodes[k]->level != heights[k]) wrong_height++;
        if (prev[heights[k]] && (uintptr_t)nodes[k] < (uintptr_t)prev[heights[k]]) down++;
        prev[heights[k]] = nodes[k];
    }
    qsort(orig, N, sizeof orig[0], cmp_ptr);
    memcpy(cls, nodes, sizeof nodes);
    qsort(cls, N, sizeof cls[0], cmp_ptr);
    for (size_t k = 0; k < N; k++) missing += cls[k] != orig[k];
    CHECK_EQ_INT(wrong_height, 0);
    CHECK_EQ_INT(down, 0);
    CHECK_EQ_INT(missing, 0);
    for (size_t k = 0; k < N; k++) free(nodes[k]);
}

static void test_refill_in_address_order(void) {
    static const size_t ns[] = {5000, 200};
    enum { M = 5000 };
    double *p = malloc(M * sizeof *p), *c = malloc(M * sizeof *c), *d = malloc(M * sizeof *d);
    uint64_t *v = malloc(M * sizeof *v);
    REQUIRE(p && c && d && v);
    for (size_t si = 0; si < 2; si++) {
        size_t n = ns[si];
        pa_pq_t *q = NULL;
        REQUIRE(wb_pq_create(0, &q) == 0);
        for (int round = 0; round < 3; round++) {
            make_set(1, n, p, c, d);
            for (size_t i = 0; i < n; i++) v[i] = i;
            size_t pushed = 0;
            CHECK_EQ_INT(wb_pq_push_many(q, n, v, p, c, d, &pushed), 0);
            CHECK_EQ_INT(level0_descents(q), 0);
            CHECK_EQ_INT(wb_pq_pop_many(q, v, n), (ssize_t)n);
            pa__ebr_barrier(); /* the popped nodes back in this thread's cache */
        }
        wb_pq_destroy(q);
    }
    free(p);
    free(c);
    free(d);
    free(v);
}

int main(void) {
    RUN_TEST(test_sort_matches_reference);
    RUN_TEST(test_signed_zero_is_one_key);
    RUN_TEST(test_push_many_order);
    RUN_TEST(test_sort_by_address);
    RUN_TEST(test_order_nodes_keeps_heights);
    RUN_TEST(test_refill_in_address_order);
    TEST_MAIN_END();
}
