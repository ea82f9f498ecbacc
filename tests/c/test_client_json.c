/*
 * test_client_json.c — the broker client's JSON codec (src/native/client_json.h): the
 * reader against valid documents (every escape, surrogate pairs, raw UTF-8, the integer
 * edges of 64 bits, duplicate keys), malformed ones (one list, each refused), every
 * truncation of a valid message, nesting at and past the depth limit (and far past it,
 * which must not grow the stack), huge numbers, bad escapes and bad UTF-8, random
 * mutations; the writer's round trip through the reader, its bounds at every capacity,
 * its refusals, and both under a locale whose decimal point is a comma.
 *
 * Every input is parsed from a heap copy of exactly its length, so a read one byte past
 * the message is an ASan error, not luck.
 *
 * Last, the client over the codec (prealloc/client.h) against a scripted peer on a Unix
 * socket (a thread of this test speaking the protocol: hello, request, a MEMORY claim
 * with a sealed memfd, release, then an answer with too many descriptors): so the musl,
 * ASan/UBSan and TSan lanes run the client's send/receive/map paths too, and the test
 * counts this process's descriptors before and after. The real broker is
 * tests/test_c_client.py's.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>
#include <math.h>
#include <stdint.h>

#include "../../src/native/client_json.h"
#include "pa_test.h"
#include "prealloc/client.h"

#ifndef F_SEAL_SHRINK
#define F_ADD_SEALS 1033
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif

/* Parses s[0..n) from an exact-size heap copy. */
static int parse_n(const char *s, size_t n, pa__json_doc_t *doc) {
    char *copy = malloc(n ? n : 1);
    if (n) memcpy(copy, s, n);
    int rc = pa__json_parse(copy, n, doc, NULL);
    free(copy);
    /* the document's strings live in its own buffer: nothing may point into the copy */
    return rc;
}

static int parse(const char *s, pa__json_doc_t *doc) { return parse_n(s, strlen(s), doc); }

static void test_valid_document(void) {
    const char *text =
        " {\"v\": 1, \"id\": 7, \"ok\": true, \"fds\": 0, \"nothing\": null, \"no\": false,\n"
        "  \"result\": {\"allocation_id\": 18446744073709551615, \"amount\": 64.5,\n"
        "              \"list\": [1, -2, 3.25e2, [], {}, \"x\"], \"neg\": -9223372036854775808},\n"
        "  \"s\": \"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u00e9\\u20ac\\ud83d\\ude00\\u0000z\",\n"
        "  \"raw\": \"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\", \"dup\": 1, \"dup\": 2 } \r\n";
    pa__json_doc_t doc;
    REQUIRE(parse(text, &doc) == 0);
    const pa__json_node_t *root = &doc.nodes[0];
    CHECK_EQ_INT(root->type, PA__JSON_OBJECT);
    CHECK_EQ_INT(root->count, 11); /* dup twice */
    CHECK_EQ_INT(root->span, doc.count);
    uint64_t u;
    int64_t i;
    double d;
    bool b;
    CHECK(pa__json_u64(pa__json_get(&doc, root, "v"), &u) == 0 && u == 1);
    CHECK(pa__json_bool(pa__json_get(&doc, root, "ok"), &b) == 0 && b);
    CHECK(pa__json_bool(pa__json_get(&doc, root, "no"), &b) == 0 && !b);
    CHECK_EQ_INT(pa__json_get(&doc, root, "nothing")->type, PA__JSON_NULL);
    CHECK(pa__json_get(&doc, root, "absent") == NULL);
    CHECK_EQ_INT(pa__json_u64(pa__json_get(&doc, root, "absent"), &u), -ENOENT);
    CHECK_EQ_INT(pa__json_bool(pa__json_get(&doc, root, "v"), &b), -EINVAL);
    const pa__json_node_t *result = pa__json_get(&doc, root, "result");
    CHECK(pa__json_u64(pa__json_get(&doc, result, "allocation_id"), &u) == 0 && u == UINT64_MAX);
    CHECK_EQ_INT(pa__json_i64(pa__json_get(&doc, result, "allocation_id"), &i), -EINVAL); /* > INT64_MAX */
    CHECK(pa__json_double(pa__json_get(&doc, result, "amount"), &d) == 0 && d == 64.5);
    CHECK_EQ_INT(pa__json_u64(pa__json_get(&doc, result, "amount"), &u), -EINVAL); /* not an integer */
    CHECK(pa__json_i64(pa__json_get(&doc, result, "neg"), &i) == 0 && i == INT64_MIN);
    CHECK_EQ_INT(pa__json_u64(pa__json_get(&doc, result, "neg"), &u), -EINVAL);
    const pa__json_node_t *list = pa__json_get(&doc, result, "list");
    REQUIRE(list && list->type == PA__JSON_ARRAY && list->count == 6);
    CHECK(pa__json_i64(pa__json_at(&doc, list, 1), &i) == 0 && i == -2);
    CHECK(pa__json_double(pa__json_at(&doc, list, 2), &d) == 0 && d == 325.0);
    CHECK_EQ_INT(pa__json_u64(pa__json_at(&doc, list, 2), &u), -EINVAL); /* 3.25e2: written with an exponent */
    CHECK(pa__json_at(&doc, list, 3)->type == PA__JSON_ARRAY && pa__json_at(&doc, list, 3)->count == 0);
    CHECK(pa__json_at(&doc, list, 4)->type == PA__JSON_OBJECT && pa__json_at(&doc, list, 4)->count == 0);
    CHECK(strcmp(pa__json_at(&doc, list, 5)->str, "x") == 0);
    CHECK(pa__json_at(&doc, list, 6) == NULL);
    const pa__json_node_t *s = pa__json_get(&doc, root, "s");
    const char want[] = "a\"b\\c/d\b\f\n\r\t\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\0z";
    REQUIRE(s && s->type == PA__JSON_STRING);
    CHECK_EQ_INT(s->count, sizeof want - 1); /* the \u0000 is counted */
    CHECK(memcmp(s->str, want, sizeof want) == 0);
    const pa__json_node_t *raw = pa__json_get(&doc, root, "raw");
    CHECK(raw && strcmp(raw->str, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80") == 0);
    CHECK(pa__json_u64(pa__json_get(&doc, root, "dup"), &u) == 0 && u == 2); /* the last wins */
    pa__json_doc_free(&doc);
    pa__json_doc_free(&doc); /* harmless twice */
    pa__json_doc_free(NULL);
}

static void test_scalars_at_top_level(void) {
    static const struct {
        const char *text;
        int type;
    } cases[] = {{"0", PA__JSON_NUMBER}, {"-0", PA__JSON_NUMBER}, {"\"\"", PA__JSON_STRING},
                 {"true", PA__JSON_TRUE}, {" null ", PA__JSON_NULL}, {"[]", PA__JSON_ARRAY},
                 {"1E+2", PA__JSON_NUMBER}, {"1e-2", PA__JSON_NUMBER}, {"-0.0e0", PA__JSON_NUMBER}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        pa__json_doc_t doc;
        int rc = parse(cases[k].text, &doc);
        if (rc) fprintf(stderr, "  refused valid %s: %d\n", cases[k].text, rc);
        CHECK_EQ_INT(rc, 0);
        if (!rc) CHECK_EQ_INT(doc.nodes[0].type, cases[k].type);
        pa__json_doc_free(&doc);
    }
    pa__json_doc_t doc;
    REQUIRE(parse("-0", &doc) == 0);
    int64_t i;
    CHECK(pa__json_i64(&doc.nodes[0], &i) == 0 && i == 0);
    CHECK(!doc.nodes[0].negative); /* -0 is the integer 0 */
    pa__json_doc_free(&doc);
}

static void test_malformed_is_refused(void) {
    static const char *cases[] = {
        "", " ", "{", "}", "[", "]", "[1,]", "[,1]", "[1 2]", "{\"a\"}", "{\"a\":}", "{a:1}",
        "{\"a\":1,}", "{\"a\" 1}", "{,}", "{\"a\":1 \"b\":2}", "{1:2}", "[\"a\",]", "[1,2", "{\"a\":1",
        "01", "-01", "[01]", "-", "--1", "1.", ".5", "+1", "1e", "1e+", "1.e5", "0x10", "1_000",
        "NaN", "Infinity", "-Infinity", "nan", "inf", "tru", "nul", "truex", "True", "NULL",
        "\"abc", "\"\\\"", "\"\\x\"", "\"\\u12\"", "\"\\u12G4\"", "\"\\U0041\"", "\"\\'\"",
        "\"\\uD800\"", "\"\\uDC00\"", "\"\\uD800\\u0041\"", "\"\\uD800\\\"", "\"\\uDBFF\\uDBFF\"",
        "\"a\tb\"", "\"a\nb\"", "\"\x01\"", "\"\x1f\"", "[1] [2]", "1 2", "{} x", "\xEF\xBB\xBF{}",
        "\"\xC0\x80\"", "\"\xC1\xBF\"", "\"\xE0\x80\xAF\"", "\"\xED\xA0\x80\"", "\"\xF0\x80\x80\xAF\"",
        "\"\xF4\x90\x80\x80\"", "\"\xF5\x80\x80\x80\"", "\"\xE2\x82\"", "\"\xE2\x82\"x", "\"\x80\"",
        "\"\xBF\"", "\"\xFF\"", "\"\xFE\"", "'a'", "[1,,2]", "/* c */ 1", "1 // c", "[\"a\"\"b\"]",
        "\"\\u00\"",
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        pa__json_doc_t doc;
        int rc = parse_n(cases[k], strlen(cases[k]), &doc);
        if (rc == 0) fprintf(stderr, "  accepted malformed case %zu: %s\n", k, cases[k]);
        CHECK(rc < 0);
        CHECK(doc.nodes == NULL && doc.count == 0 && doc.strings == NULL); /* nothing kept */
        pa__json_doc_free(&doc);
    }
    /* NUL bytes are no terminator and no whitespace: refused outside strings and raw in them */
    pa__json_doc_t doc;
    CHECK_EQ_INT(parse_n("\0", 1, &doc), -EINVAL);
    CHECK_EQ_INT(parse_n("[\0]", 3, &doc), -EINVAL);
    CHECK_EQ_INT(parse_n("1\0", 2, &doc), -EINVAL);
    CHECK_EQ_INT(parse_n("\"a\0\"", 4, &doc), -EINVAL);
    /* bad arguments */
    CHECK_EQ_INT(pa__json_parse(NULL, 3, &doc, NULL), -EINVAL);
    CHECK_EQ_INT(pa__json_parse("1", 1, NULL, NULL), -EINVAL);
    CHECK_EQ_INT(pa__json_parse(NULL, 0, &doc, NULL), -EINVAL);
    pa__json_doc_free(&doc);
}

static void test_error_offset(void) {
    pa__json_doc_t doc;
    size_t offset = 99;
    const char *text = "{\"a\": [1, 2, x]}";
    char *copy = malloc(strlen(text));
    memcpy(copy, text, strlen(text));
    CHECK_EQ_INT(pa__json_parse(copy, strlen(text), &doc, &offset), -EINVAL);
    CHECK_EQ_INT(offset, 13); /* at the x */
    free(copy);
}

/* Every proper prefix of a valid object is refused, and none is read past its end. */
static void test_every_truncation_is_refused(void) {
    const char *text = "{\"v\":1,\"id\":12,\"ok\":false,\"error\":{\"type\":\"KeyError\","
                       "\"message\":\"no allocation 5 \\u00e9\\ud83d\\ude00\"},\"n\":[1.5e-3,-0,true,null]}";
    size_t n = strlen(text);
    pa__json_doc_t doc;
    REQUIRE(parse_n(text, n, &doc) == 0);
    pa__json_doc_free(&doc);
    for (size_t len = 0; len < n; len++) {
        int rc = parse_n(text, len, &doc);
        if (rc == 0) fprintf(stderr, "  accepted the prefix of %zu bytes\n", len);
        CHECK(rc < 0);
    }
}

static char *nested(size_t depth, bool objects) {
    /* [[...1...]] or {"a":{"a":...1...}} */
    size_t open_len = objects ? 5 : 1;
    char *s = malloc(depth * (open_len + 1) + 2);
    size_t k = 0;
    for (size_t i = 0; i < depth; i++) {
        memcpy(s + k, objects ? "{\"a\":" : "[", open_len);
        k += open_len;
    }
    s[k++] = '1';
    for (size_t i = 0; i < depth; i++) s[k++] = objects ? '}' : ']';
    s[k] = '\0';
    return s;
}

static void test_depth_limit(void) {
    for (int objects = 0; objects < 2; objects++) {
        pa__json_doc_t doc;
        char *at = nested(PA__JSON_MAX_DEPTH, objects);
        CHECK_EQ_INT(parse(at, &doc), 0);
        if (doc.nodes) CHECK_EQ_INT(doc.nodes[0].span, doc.count);
        pa__json_doc_free(&doc);
        free(at);
        char *past = nested(PA__JSON_MAX_DEPTH + 1, objects);
        CHECK_EQ_INT(parse(past, &doc), -ELOOP);
        free(past);
        /* far past the limit: refused at the limit, the stack never grows with the input */
        char *deep = nested(100000, objects);
        CHECK_EQ_INT(parse(deep, &doc), -ELOOP);
        free(deep);
        /* unterminated deep nesting is refused too */
        char *open = nested(100000, objects);
        open[strlen(open) / 2] = '\0';
        CHECK(parse(open, &doc) < 0);
        free(open);
    }
}

static void test_huge_numbers(void) {
    pa__json_doc_t doc;
    uint64_t u;
    int64_t i;
    double d;
    CHECK_EQ_INT(parse("1e400", &doc), -ERANGE);
    CHECK_EQ_INT(parse("-1e400", &doc), -ERANGE);
    CHECK_EQ_INT(parse("[1, 2e308]", &doc), -ERANGE);
    REQUIRE(parse("18446744073709551616", &doc) == 0); /* 2^64: no longer an exact integer */
    CHECK(!doc.nodes[0].integral);
    CHECK_EQ_INT(pa__json_u64(&doc.nodes[0], &u), -EINVAL);
    CHECK(pa__json_double(&doc.nodes[0], &d) == 0 && d == 18446744073709551616.0);
    pa__json_doc_free(&doc);
    REQUIRE(parse("-9223372036854775809", &doc) == 0); /* below INT64_MIN */
    CHECK_EQ_INT(pa__json_i64(&doc.nodes[0], &i), -EINVAL);
    pa__json_doc_free(&doc);
    REQUIRE(parse("9223372036854775807", &doc) == 0);
    CHECK(pa__json_i64(&doc.nodes[0], &i) == 0 && i == INT64_MAX);
    pa__json_doc_free(&doc);
    REQUIRE(parse("1e-400", &doc) == 0); /* underflow is a tiny number, 0 */
    CHECK(pa__json_double(&doc.nodes[0], &d) == 0 && d == 0.0);
    pa__json_doc_free(&doc);
    /* a 400-digit integer overflows a double: refused; a 300-digit one does not */
    char digits[402];
    memset(digits, '9', 400);
    digits[400] = '\0';
    CHECK_EQ_INT(parse(digits, &doc), -ERANGE);
    digits[300] = '\0';
    REQUIRE(parse(digits, &doc) == 0);
    CHECK(!doc.nodes[0].integral && doc.nodes[0].number > 9e299);
    pa__json_doc_free(&doc);
    /* a long fraction takes the heap path of the conversion */
    size_t n = 5000;
    char *frac = malloc(n + 1);
    memcpy(frac, "0.5", 3);
    memset(frac + 3, '0', n - 4);
    frac[n - 1] = '1';
    frac[n] = '\0';
    REQUIRE(parse(frac, &doc) == 0);
    CHECK(doc.nodes[0].number == 0.5);
    pa__json_doc_free(&doc);
    free(frac);
}

/* Random byte changes of a valid message: accepted or refused, never a crash or a read
 * out of bounds (ASan), and an accepted one is a well-formed tree. */
static void test_random_mutations(void) {
    const char *text = "{\"v\":1,\"id\":3,\"ok\":true,\"fds\":1,\"result\":{\"allocation_id\":4294967297,"
                       "\"resource_type\":\"memory\",\"memory\":{\"size\":1048576,\"offset\":0},"
                       "\"details\":{\"s\":\"\\u00e9\\n\",\"l\":[1,2.5,-3e2,null,false]}}}";
    size_t n = strlen(text);
    char *buf = malloc(n);
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    static const char alphabet[] = "{}[]\":,\\u0123456789eE+-.tfn \x80\xC3\xED\xF4\xFF";
    long rounds = pa_stress(20000), accepted = 0;
    for (long r = 0; r < rounds; r++) {
        memcpy(buf, text, n);
        int edits = 1 + (int)(pa_rand_next(&rng) % 4);
        for (int e = 0; e < edits; e++)
            buf[pa_rand_next(&rng) % n] = alphabet[pa_rand_next(&rng) % (sizeof alphabet - 1)];
        size_t len = n - (size_t)(pa_rand_next(&rng) % 3 == 0 ? pa_rand_next(&rng) % n : 0);
        pa__json_doc_t doc;
        if (pa__json_parse(buf, len, &doc, NULL) == 0) {
            accepted++;
            CHECK(doc.count > 0 && doc.nodes[0].span == doc.count);
            pa__json_doc_free(&doc);
        }
    }
    CHECK(accepted > 0 && accepted < rounds); /* the mutations reach both outcomes */
    free(buf);
}

/* ---- writer ---- */

/* Writes a request like the client's into w. */
static void write_request(pa__jw_t *w) {
    pa__jw_object_begin(w);
    pa__jw_key(w, "v");
    pa__jw_u64(w, 1);
    pa__jw_key(w, "id");
    pa__jw_u64(w, UINT64_MAX);
    pa__jw_key(w, "op");
    pa__jw_string(w, "request_preallocation");
    pa__jw_key(w, "args");
    pa__jw_object_begin(w);
    pa__jw_key(w, "weird \"key\"\n");
    pa__jw_string(w, "q\"b\\s\x01\x1f\t\r\n/\xc3\xa9\xf0\x9f\x98\x80");
    pa__jw_key(w, "doubles");
    pa__jw_array_begin(w);
    pa__jw_double(w, 0.1);
    pa__jw_double(w, -5e-324);
    pa__jw_double(w, 1.7976931348623157e308);
    pa__jw_double(w, -0.0);
    pa__jw_double(w, 64.0);
    pa__jw_array_end(w);
    pa__jw_key(w, "ints");
    pa__jw_array_begin(w);
    pa__jw_i64(w, INT64_MIN);
    pa__jw_i64(w, -1);
    pa__jw_i64(w, 0);
    pa__jw_array_end(w);
    pa__jw_key(w, "flags");
    pa__jw_array_begin(w);
    pa__jw_bool(w, true);
    pa__jw_bool(w, false);
    pa__jw_null(w);
    pa__jw_array_begin(w);
    pa__jw_array_end(w);
    pa__jw_object_begin(w);
    pa__jw_object_end(w);
    pa__jw_array_end(w);
    pa__jw_object_end(w);
    pa__jw_object_end(w);
}

static void check_request(const pa__json_doc_t *doc) {
    const pa__json_node_t *root = &doc->nodes[0];
    uint64_t u;
    int64_t i;
    double d;
    CHECK(pa__json_u64(pa__json_get(doc, root, "id"), &u) == 0 && u == UINT64_MAX);
    const pa__json_node_t *args = pa__json_get(doc, root, "args");
    const pa__json_node_t *weird = pa__json_get(doc, args, "weird \"key\"\n");
    const char want[] = "q\"b\\s\x01\x1f\t\r\n/\xc3\xa9\xf0\x9f\x98\x80";
    CHECK(weird && weird->count == sizeof want - 1 && memcmp(weird->str, want, sizeof want) == 0);
    const pa__json_node_t *doubles = pa__json_get(doc, args, "doubles");
    static const double want_d[] = {0.1, -5e-324, 1.7976931348623157e308, -0.0, 64.0};
    for (size_t k = 0; k < 5; k++) {
        CHECK(pa__json_double(pa__json_at(doc, doubles, k), &d) == 0 && d == want_d[k]);
        CHECK(signbit(d) == signbit(want_d[k]));
    }
    CHECK(pa__json_u64(pa__json_at(doc, doubles, 4), &u) == 0 && u == 64); /* 64.0 is written "64" */
    const pa__json_node_t *ints = pa__json_get(doc, args, "ints");
    CHECK(pa__json_i64(pa__json_at(doc, ints, 0), &i) == 0 && i == INT64_MIN);
    CHECK(pa__json_i64(pa__json_at(doc, ints, 1), &i) == 0 && i == -1);
    const pa__json_node_t *flags = pa__json_get(doc, args, "flags");
    CHECK(flags && flags->count == 5 && pa__json_at(doc, flags, 2)->type == PA__JSON_NULL);
}

static void test_writer_round_trip(void) {
    char buf[1024];
    pa__jw_t w;
    pa__jw_init(&w, buf, sizeof buf);
    write_request(&w);
    size_t len = 0;
    REQUIRE(pa__jw_finish(&w, &len) == 0);
    CHECK_EQ_INT(strlen(buf), len);
    pa__json_doc_t doc;
    REQUIRE(parse_n(buf, len, &doc) == 0);
    check_request(&doc);
    pa__json_doc_free(&doc);
}

/* At every capacity the writer stays inside the buffer (an exact-size heap block: ASan)
 * and succeeds exactly when the text and its NUL fit. */
static void test_writer_bounds(void) {
    char full[1024];
    pa__jw_t w;
    pa__jw_init(&w, full, sizeof full);
    write_request(&w);
    size_t len;
    REQUIRE(pa__jw_finish(&w, &len) == 0);
    for (size_t cap = 0; cap <= len + 1; cap++) {
        char *buf = cap ? malloc(cap) : NULL;
        pa__jw_init(&w, buf, cap);
        write_request(&w);
        int rc = pa__jw_finish(&w, NULL);
        if (cap > len) {
            CHECK_EQ_INT(rc, 0);
            CHECK(memcmp(buf, full, len + 1) == 0);
        } else {
            CHECK_EQ_INT(rc, -EMSGSIZE);
            if (cap) CHECK(memchr(buf, '\0', cap) != NULL); /* what was written is terminated */
        }
        free(buf);
    }
}

static void test_writer_refusals(void) {
    char buf[256];
    pa__jw_t w;
    /* non-finite doubles */
    double bad[] = {NAN, INFINITY, -INFINITY};
    for (size_t k = 0; k < 3; k++) {
        pa__jw_init(&w, buf, sizeof buf);
        pa__jw_array_begin(&w);
        pa__jw_double(&w, bad[k]);
        pa__jw_array_end(&w);
        CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    }
    /* strings that are not UTF-8 */
    const char *bad_strings[] = {"\xff", "a\xc3", "\xed\xa0\x80", "\xc0\x80"};
    for (size_t k = 0; k < 4; k++) {
        pa__jw_init(&w, buf, sizeof buf);
        pa__jw_string(&w, bad_strings[k]);
        CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    }
    /* misuse: a value where a key is due, a key in an array, a dangling key, mismatched
     * and unbalanced ends, two top-level values, an empty document, a NULL string */
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_object_begin(&w);
    pa__jw_u64(&w, 1);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_array_begin(&w);
    pa__jw_key(&w, "a");
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_object_begin(&w);
    pa__jw_key(&w, "a");
    pa__jw_object_end(&w);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_object_begin(&w);
    pa__jw_array_end(&w);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_array_end(&w);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_array_begin(&w);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL); /* unfinished */
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_u64(&w, 1);
    pa__jw_u64(&w, 2);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    pa__jw_init(&w, buf, sizeof buf);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL); /* nothing written */
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_string(&w, NULL);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    /* nesting past the depth limit */
    pa__jw_init(&w, buf, sizeof buf);
    for (int k = 0; k <= PA__JSON_MAX_DEPTH; k++) pa__jw_array_begin(&w);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
    CHECK_EQ_INT(pa__jw_finish(NULL, NULL), -EINVAL);
    /* an error sticks: later calls change nothing */
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_array_begin(&w);
    pa__jw_double(&w, NAN);
    size_t before = w.len;
    pa__jw_u64(&w, 5);
    pa__jw_array_end(&w);
    CHECK_EQ_INT(w.len, before);
    CHECK_EQ_INT(pa__jw_finish(&w, NULL), -EINVAL);
}

/* A host that set a locale with a decimal comma reads and writes the same text. */
static void test_locale_independence(void) {
    const char *names[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "C.UTF-8"};
    const char *set = NULL;
    for (size_t k = 0; k < sizeof names / sizeof names[0] && !set; k++) set = setlocale(LC_NUMERIC, names[k]);
    bool comma = set && localeconv()->decimal_point[0] == ',';
    if (!comma) fprintf(stderr, "  (no decimal-comma locale here: checked in the C locale only)\n");
    char buf[64];
    pa__jw_t w;
    pa__jw_init(&w, buf, sizeof buf);
    pa__jw_double(&w, 1.5);
    CHECK(pa__jw_finish(&w, NULL) == 0 && strcmp(buf, "1.5") == 0);
    pa__json_doc_t doc;
    CHECK(parse("2.25", &doc) == 0 && doc.nodes[0].number == 2.25);
    pa__json_doc_free(&doc);
    setlocale(LC_NUMERIC, "C");
}

/* ---- the client against a scripted peer ---- */

typedef struct peer {
    int listener;
    int failures;
} peer_t;

static int open_fd_count(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1;
}

static void send_with_fds(int fd, const char *text, const int *fds, size_t nfds) {
    struct iovec iov = {(void *)text, strlen(text)};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * 8)];
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *h = CMSG_FIRSTHDR(&msg);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(h), fds, sizeof(int) * nfds);
    }
    sendmsg(fd, &msg, MSG_NOSIGNAL);
}

static int sealed_memfd(size_t size) {
    int fd = (int)syscall(SYS_memfd_create, "test_client", MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    if (ftruncate(fd, (off_t)size) || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL)) {
        close(fd);
        return -1;
    }
    pwrite(fd, "\x2a", 1, 0);
    return fd;
}

/* Answers one connection: each request by its op, as the broker would, except "claim" of
 * allocation 9, which gets six descriptors (more than MAX_FDS). */
static void *scripted_peer(void *arg) {
    peer_t *p = arg;
    int conn = accept(p->listener, NULL, NULL);
    if (conn < 0) {
        p->failures++;
        return NULL;
    }
    char buf[PA_CLIENT_MAX_MESSAGE + 1], answer[1024];
    ssize_t n;
    while ((n = recv(conn, buf, sizeof buf, 0)) > 0) {
        pa__json_doc_t doc;
        if (pa__json_parse(buf, (size_t)n, &doc, NULL)) {
            p->failures++;
            break;
        }
        const pa__json_node_t *root = &doc.nodes[0], *args = pa__json_get(&doc, root, "args");
        uint64_t id = 0, allocation_id = 0;
        pa__json_u64(pa__json_get(&doc, root, "id"), &id);
        pa__json_u64(pa__json_get(&doc, args, "allocation_id"), &allocation_id);
        const pa__json_node_t *op = pa__json_get(&doc, root, "op");
        const char *name = op && op->type == PA__JSON_STRING ? op->str : "";
        if (strcmp(name, "hello") == 0) {
            snprintf(answer, sizeof answer, "{\"v\":1,\"id\":%llu,\"ok\":true,\"result\":{\"versions\":[1],"
                     "\"server\":\"scripted\",\"pid\":%d,\"uid\":%d,\"peer\":{\"pid\":%d,\"uid\":%d,\"gid\":%d}}}",
                     (unsigned long long)id, (int)getpid(), (int)getuid(), (int)getpid(), (int)getuid(), (int)getgid());
            send_with_fds(conn, answer, NULL, 0);
        } else if (strcmp(name, "request_preallocation") == 0) {
            snprintf(answer, sizeof answer, "{\"v\":1,\"id\":%llu,\"ok\":true,\"result\":{\"allocation_id\":"
                     "18446744073709551615,\"status\":\"allocated\",\"resource_type\":\"memory\"}}",
                     (unsigned long long)id);
            send_with_fds(conn, answer, NULL, 0);
        } else if (strcmp(name, "claim") == 0 && allocation_id == 9) {
            int fds[6];
            for (int i = 0; i < 6; i++) fds[i] = sealed_memfd(4096);
            snprintf(answer, sizeof answer, "{\"v\":1,\"id\":%llu,\"ok\":true,\"fds\":6,\"result\":{}}",
                     (unsigned long long)id);
            send_with_fds(conn, answer, fds, 6);
            for (int i = 0; i < 6; i++) close(fds[i]);
        } else if (strcmp(name, "claim") == 0) {
            int fd = sealed_memfd(1 << 16);
            snprintf(answer, sizeof answer, "{\"v\":1,\"id\":%llu,\"ok\":true,\"fds\":1,\"result\":{"
                     "\"allocation_id\":%llu,\"resource_type\":\"memory\",\"amount\":0.0625,"
                     "\"memory\":{\"size\":65536,\"offset\":0},\"unknown_field\":[{}]}}",
                     (unsigned long long)id, (unsigned long long)allocation_id);
            send_with_fds(conn, answer, &fd, 1);
            close(fd);
        } else if (strcmp(name, "release_allocation") == 0) {
            snprintf(answer, sizeof answer, allocation_id == 7
                     ? "{\"v\":1,\"id\":%llu,\"ok\":false,\"error\":{\"type\":\"KeyError\",\"message\":\"unknown allocation 7\"}}"
                     : "{\"v\":1,\"id\":%llu,\"ok\":true,\"result\":{\"released\":true}}",
                     (unsigned long long)id);
            send_with_fds(conn, answer, NULL, 0);
        } else {
            snprintf(answer, sizeof answer, "{\"v\":1,\"id\":%llu,\"ok\":true,\"result\":{}}",
                     (unsigned long long)id);
            send_with_fds(conn, answer, NULL, 0);
        }
        pa__json_doc_free(&doc);
    }
    close(conn);
    return NULL;
}

static void test_client_against_a_scripted_peer(void) {
    char path[108];
    snprintf(path, sizeof path, "/tmp/pa-test-client-%d.sock", (int)getpid());
    unlink(path);
    int before = open_fd_count();
    peer_t peer = {.listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0)};
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    REQUIRE(peer.listener >= 0);
    REQUIRE(bind(peer.listener, (struct sockaddr *)&addr, sizeof addr) == 0 && listen(peer.listener, 1) == 0);
    pthread_t thread;
    REQUIRE(pthread_create(&thread, NULL, scripted_peer, &peer) == 0);

    pa_client_t *c = NULL;
    CHECK_EQ_INT(pa_client_connect(path, NULL), -EINVAL);
    REQUIRE(pa_client_connect(path, &c) == 0);
    pa_client_hello_t hello;
    CHECK_EQ_INT(pa_client_hello(c, "test", &hello), 0);
    CHECK(strcmp(hello.server, "scripted") == 0 && hello.peer_pid == getpid());
    uint64_t id = 0;
    CHECK_EQ_INT(pa_client_request_memory(c, 0.0625, 0, &id), 0);
    CHECK(id == UINT64_MAX); /* all 64 bits of an allocation id survive */
    CHECK_EQ_INT(pa_client_request_memory(c, NAN, 0, &id), -EINVAL);
    pa_client_error_t e;
    CHECK(pa_client_last_error(c, &e) == 0 && e.code == -EINVAL && e.type[0] == '\0');
    void *mem = NULL;
    size_t size = 0;
    CHECK_EQ_INT(pa_client_claim_memory(c, 5, &mem, &size), 0);
    CHECK(size == 65536 && mem && ((unsigned char *)mem)[0] == 0x2a);
    if (mem) memset(mem, 1, size); /* writable, MAP_SHARED */
    CHECK_EQ_INT(pa_client_last_error(c, &e), 0);
    CHECK_EQ_INT(e.code, 0);
    bool released = false;
    CHECK_EQ_INT(pa_client_release(c, 5, &released), 0);
    CHECK(released);
    CHECK_EQ_INT(pa_client_release(c, 7, NULL), -ENOENT);
    CHECK(pa_client_last_error(c, &e) == 0 && strcmp(e.type, "KeyError") == 0 &&
          strcmp(e.message, "unknown allocation 7") == 0);
    /* six descriptors: MSG_CTRUNC, every received one closed, the connection out of step */
    CHECK_EQ_INT(pa_client_claim_memory(c, 9, &mem, &size), -EPROTO);
    CHECK_EQ_INT(pa_client_hello(c, NULL, NULL), -ENOTCONN);
    pa_client_close(c);
    pa_client_close(NULL);
    pthread_join(thread, NULL);
    close(peer.listener);
    unlink(path);
    CHECK_EQ_INT(peer.failures, 0);
    CHECK_EQ_INT(open_fd_count(), before); /* no descriptor left behind, in either side */
    CHECK_EQ_INT(pa_client_connect(path, &c), -ENOENT);
}

int main(void) {
    RUN_TEST(test_valid_document);
    RUN_TEST(test_scalars_at_top_level);
    RUN_TEST(test_malformed_is_refused);
    RUN_TEST(test_error_offset);
    RUN_TEST(test_every_truncation_is_refused);
    RUN_TEST(test_depth_limit);
    RUN_TEST(test_huge_numbers);
    RUN_TEST(test_random_mutations);
    RUN_TEST(test_writer_round_trip);
    RUN_TEST(test_writer_bounds);
    RUN_TEST(test_writer_refusals);
    RUN_TEST(test_locale_independence);
    RUN_TEST(test_client_against_a_scripted_peer);
    TEST_MAIN_END();
}
