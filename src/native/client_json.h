/*
 * client_json.h — the broker client's JSON codec (internal: not installed, not part of the
 * public face; the C tests include it to test the codec on its own).
 *
 * Why a codec of our own: the broker protocol (docs/protocol.md) is one UTF-8 JSON object
 * per message, at most PA_CLIENT_MAX_MESSAGE bytes, and the core takes no dependency. The
 * client needs little of JSON but must never be fooled by a broken or hostile answer, so
 * the reader is strict and bounded rather than forgiving:
 *
 * Reader
 * ------
 * pa__json_parse(text, len) reads exactly len bytes (no NUL needed, never a byte past
 * them) and accepts exactly RFC 8259's grammar: one value, optional whitespace around it,
 * nothing after. Refused (-EINVAL unless said): bytes after the value, a BOM, NaN /
 * Infinity / hex / leading '+' or leading zeros / '.5' / '5.', control characters inside
 * strings, invalid UTF-8 (overlong forms, encoded surrogates, > U+10FFFF, truncated
 * sequences), unknown escapes, \u with fewer than 4 hex digits, unpaired surrogates
 * (\uD800 alone, \uDC00 first), nesting deeper than PA__JSON_MAX_DEPTH (-ELOOP), a number
 * too large for a double (-ERANGE; the protocol has no Infinity), input longer than
 * PA__JSON_MAX_INPUT (-EMSGSIZE), more than PA__JSON_MAX_NODES values (-E2BIG).
 * Duplicate object keys are accepted and the last one wins, as in Python's json module
 * (the broker's own reader), so both ends read one message alike.
 *
 * The parsed document is a flat array of nodes in document order (pre-order): an array
 * node is followed by its elements, an object node by key, value, key, value...; every
 * node knows how many nodes its subtree spans, so a sibling is one addition away and a
 * lookup never recurses. Strings are decoded (escapes resolved, \u to UTF-8) into one
 * buffer the size of the input (a decoded string plus its NUL never outgrows its quoted
 * source), NUL-terminated, with their byte length (a \u0000 inside stays counted).
 * Numbers keep the double strtod gives (read in the C locale whatever the host's
 * LC_NUMERIC) and, when written as an integer (no fraction, no exponent) that fits 64
 * bits, the exact integer — allocation ids use all 64 bits, more than a double holds.
 *
 * Cost: O(len) time; memory O(len) (nodes grow by doubling, at most one per 2 bytes of
 * input). Recursion depth is bounded by PA__JSON_MAX_DEPTH.
 *
 * Writer
 * ------
 * pa__jw_* appends to a caller-owned buffer of fixed capacity, placing commas and colons
 * itself. It never writes past the capacity: an overflow, a non-finite double, a string
 * that is not valid UTF-8 or a misplaced call (a value where a key is due, an unbalanced
 * end) sticks as the writer's error and pa__jw_finish answers it (-EMSGSIZE, -EINVAL).
 * Strings are escaped ("\\", "\"", control characters as \u00XX); doubles are written with
 * 17 significant digits (they read back bit-exact) in the C locale.
 *
 * Thread safety: a document or a writer belongs to one thread at a time; distinct ones are
 * independent (no global state but a C locale object created once).
 */
#ifndef PREALLOC_CLIENT_JSON_H
#define PREALLOC_CLIENT_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "prealloc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PA__JSON_MAX_DEPTH 32
#define PA__JSON_MAX_INPUT (1u << 20)
#define PA__JSON_MAX_NODES (PA__JSON_MAX_INPUT / 2 + 1)

typedef enum pa__json_type {
    PA__JSON_NULL = 0,
    PA__JSON_FALSE,
    PA__JSON_TRUE,
    PA__JSON_NUMBER,
    PA__JSON_STRING,
    PA__JSON_ARRAY,
    PA__JSON_OBJECT
} pa__json_type_t;

typedef struct pa__json_node {
    uint8_t type;       /* pa__json_type_t */
    bool integral;      /* NUMBER written as an integer that fits int64 or uint64 */
    bool negative;      /* integral and < 0 (then i64 holds it), else u64 does */
    uint32_t span;      /* nodes in this subtree, itself included */
    uint32_t count;     /* ARRAY: elements; OBJECT: members; STRING: byte length */
    const char *str;    /* STRING: decoded, NUL-terminated (inside the document) */
    double number;      /* NUMBER */
    uint64_t u64;       /* NUMBER, integral and not negative */
    int64_t i64;        /* NUMBER, integral and fits int64 */
} pa__json_node_t;

typedef struct pa__json_doc {
    pa__json_node_t *nodes; /* nodes[0] is the root */
    size_t count;
    size_t capacity;
    char *strings;          /* the decoded strings */
} pa__json_doc_t;

/* Parses text[0..len). 0 and *doc filled (free it with pa__json_doc_free), or a -errno
 * above and *doc empty (pa__json_doc_free on it is harmless). *error_offset (nullable)
 * receives the byte offset where reading stopped. -EINVAL also for doc or text NULL
 * (text may be NULL when len is 0: then the empty input is refused as malformed). */
int pa__json_parse(const char *text, size_t len, pa__json_doc_t *doc, size_t *error_offset);
/* Frees what the document holds and leaves it empty; NULL does nothing. */
void pa__json_doc_free(pa__json_doc_t *doc);

/* The node of member key in object node obj (its last occurrence), or NULL (obj NULL or
 * not an object, key absent). */
const pa__json_node_t *pa__json_get(const pa__json_doc_t *doc, const pa__json_node_t *obj,
                                    const char *key);
/* Element i of array node arr, or NULL. O(i). */
const pa__json_node_t *pa__json_at(const pa__json_doc_t *doc, const pa__json_node_t *arr, size_t i);
/* The node after node's subtree (its next sibling inside a container); no bounds check:
 * use within a container's count. */
static inline const pa__json_node_t *pa__json_next(const pa__json_node_t *node) { return node + node->span; }

/* Typed reads of a node (nullable): 0, -ENOENT (NULL: absent), -EINVAL (another type, or
 * a number that is not an integer / out of the type's range). */
int pa__json_u64(const pa__json_node_t *node, uint64_t *out);
int pa__json_i64(const pa__json_node_t *node, int64_t *out);
int pa__json_double(const pa__json_node_t *node, double *out);
int pa__json_bool(const pa__json_node_t *node, bool *out);

/* ---- the writer ---- */

typedef struct pa__jw {
    char *buf;
    size_t capacity;
    size_t len;
    int error;            /* first error, sticky: 0, -EMSGSIZE, -EINVAL */
    int depth;
    uint64_t in_object;   /* bit d: the container at depth d is an object */
    uint64_t has_items;   /* bit d: the container at depth d holds something already */
    bool key_pending;     /* a key was written, its value is due */
} pa__jw_t;

/* buf holds capacity bytes; the text is NUL-terminated when it fits capacity - 1. */
void pa__jw_init(pa__jw_t *w, char *buf, size_t capacity);
void pa__jw_object_begin(pa__jw_t *w);
void pa__jw_object_end(pa__jw_t *w);
void pa__jw_array_begin(pa__jw_t *w);
void pa__jw_array_end(pa__jw_t *w);
/* key must be valid UTF-8; the next call writes its value */
void pa__jw_key(pa__jw_t *w, const char *key);
void pa__jw_string(pa__jw_t *w, const char *s);
void pa__jw_string_n(pa__jw_t *w, const char *s, size_t n);
void pa__jw_u64(pa__jw_t *w, uint64_t v);
void pa__jw_i64(pa__jw_t *w, int64_t v);
void pa__jw_double(pa__jw_t *w, double v); /* NaN, +-inf: -EINVAL */
void pa__jw_bool(pa__jw_t *w, bool v);
void pa__jw_null(pa__jw_t *w);
/* 0 and *len (nullable) the text's length once one complete value was written and every
 * container closed; else the sticky error, or -EINVAL for an unfinished document. */
int pa__jw_finish(pa__jw_t *w, size_t *len);

#ifdef __cplusplus
}
#endif
#endif /* PREALLOC_CLIENT_JSON_H */
