/*
 * client_json.c — the broker client's strict, bounded JSON reader and writer. The design
 * (what is accepted, what refused, the node layout, the bounds) is in client_json.h.
 *
 * The reader is a recursive descent over RFC 8259's grammar; recursion goes one level per
 * container and stops at PA__JSON_MAX_DEPTH, so the stack it takes is bounded. Every read
 * of a byte checks the position against len first: the input needs no terminator and
 * nothing past it is touched (ASan checks this in tests/c/test_client_json.c, which parses
 * from exact-size heap copies).
 */
#define _GNU_SOURCE
#include "client_json.h"

#include <errno.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the C locale, for strtod / snprintf whatever the host set with setlocale ---- */

static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;
static locale_t c_locale = (locale_t)0;

static void c_locale_create(void) { c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0); }

/* The C locale object, or 0 when it could not be made (ENOMEM). It is never freed: one
 * object for the life of the process, like the C library's own "C" locale. */
static locale_t c_locale_get(void) {
    pthread_once(&c_locale_once, c_locale_create);
    return c_locale;
}

/* ---- reader ---- */

typedef struct parser {
    const unsigned char *text;
    size_t len;
    size_t pos;
    pa__json_doc_t *doc;
    size_t strings_used;
} parser_t;

static int new_node(parser_t *p, uint8_t type, size_t *index) {
    pa__json_doc_t *doc = p->doc;
    if (doc->count == doc->capacity) {
        if (doc->capacity >= PA__JSON_MAX_NODES) return -E2BIG;
        /* first guess from the input (a value takes ~8 bytes or more in the broker's
         * answers), so a typical answer takes one allocation, not a series */
        size_t cap = doc->capacity ? doc->capacity * 2 : 16 + p->len / 8;
        if (cap > PA__JSON_MAX_NODES) cap = PA__JSON_MAX_NODES;
        pa__json_node_t *nodes = realloc(doc->nodes, cap * sizeof *nodes);
        if (!nodes) return -ENOMEM;
        doc->nodes = nodes;
        doc->capacity = cap;
    }
    *index = doc->count++;
    pa__json_node_t *n = &doc->nodes[*index];
    memset(n, 0, sizeof *n);
    n->type = type;
    n->span = 1;
    return 0;
}

static void skip_ws(parser_t *p) {
    while (p->pos < p->len) {
        unsigned char c = p->text[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Four hex digits at p->pos (after "\u"); advances past them. */
static int read_hex4(parser_t *p, unsigned *out) {
    if (p->len - p->pos < 4) return -EINVAL;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hex_value(p->text[p->pos + (size_t)i]);
        if (h < 0) return -EINVAL;
        v = v << 4 | (unsigned)h;
    }
    p->pos += 4;
    *out = v;
    return 0;
}

static size_t put_utf8(char *out, unsigned cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence starting at s[0] (a byte >= 0x80), at most avail
 * bytes long; 0 when invalid (RFC 3629's table: no overlongs, no surrogates, <= U+10FFFF). */
static size_t utf8_sequence(const unsigned char *s, size_t avail) {
    unsigned char c = s[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;      /* overlong below U+0800 */
        else if (c == 0xED) hi = 0x9F; /* U+D800..U+DFFF: surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;      /* overlong below U+10000 */
        else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
    } else {
        return 0;
    }
    if (avail < n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return n;
}

/* A string at p->pos (its opening quote); decodes it into the string buffer. */
static int parse_string(parser_t *p, size_t *index) {
    int rc = new_node(p, PA__JSON_STRING, index);
    if (rc) return rc;
    p->pos++; /* the opening quote */
    char *out = p->doc->strings + p->strings_used;
    size_t n = 0;
    for (;;) {
        if (p->pos >= p->len) return -EINVAL; /* unterminated */
        unsigned char c = p->text[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20) return -EINVAL;
        if (c == '\\') {
            if (++p->pos >= p->len) return -EINVAL;
            unsigned char e = p->text[p->pos++];
            switch (e) {
            case '"': out[n++] = '"'; break;
            case '\\': out[n++] = '\\'; break;
            case '/': out[n++] = '/'; break;
            case 'b': out[n++] = '\b'; break;
            case 'f': out[n++] = '\f'; break;
            case 'n': out[n++] = '\n'; break;
            case 'r': out[n++] = '\r'; break;
            case 't': out[n++] = '\t'; break;
            case 'u': {
                unsigned cp;
                if ((rc = read_hex4(p, &cp))) return rc;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return -EINVAL; /* low surrogate first */
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    unsigned low;
                    if (p->len - p->pos < 2 || p->text[p->pos] != '\\' || p->text[p->pos + 1] != 'u')
                        return -EINVAL; /* high surrogate alone */
                    p->pos += 2;
                    if ((rc = read_hex4(p, &low))) return rc;
                    if (low < 0xDC00 || low > 0xDFFF) return -EINVAL;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                }
                n += put_utf8(out + n, cp);
                break;
            }
            default:
                return -EINVAL;
            }
            continue;
        }
        if (c < 0x80) {
            out[n++] = (char)c;
            p->pos++;
            continue;
        }
        size_t seq = utf8_sequence(p->text + p->pos, p->len - p->pos);
        if (!seq) return -EINVAL;
        memcpy(out + n, p->text + p->pos, seq);
        n += seq;
        p->pos += seq;
    }
    if (n > UINT32_MAX) return -E2BIG;
    out[n] = '\0';
    p->strings_used += n + 1;
    pa__json_node_t *node = &p->doc->nodes[*index];
    node->str = out;
    node->count = (uint32_t)n;
    return 0;
}

static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int parse_number(parser_t *p, size_t *index) {
    int rc = new_node(p, PA__JSON_NUMBER, index);
    if (rc) return rc;
    size_t start = p->pos;
    bool negative = false, integral = true;
    if (p->text[p->pos] == '-') {
        negative = true;
        p->pos++;
    }
    if (p->pos >= p->len || !is_digit(p->text[p->pos])) return -EINVAL;
    /* The integer part, accumulated exactly while it fits 64 bits. */
    uint64_t magnitude = 0;
    bool overflow = false;
    if (p->text[p->pos] == '0') {
        p->pos++;
        if (p->pos < p->len && is_digit(p->text[p->pos])) return -EINVAL; /* leading zero */
    } else {
        while (p->pos < p->len && is_digit(p->text[p->pos])) {
            unsigned d = (unsigned)(p->text[p->pos++] - '0');
            if (magnitude > (UINT64_MAX - d) / 10) overflow = true;
            else magnitude = magnitude * 10 + d;
        }
    }
    if (p->pos < p->len && p->text[p->pos] == '.') {
        integral = false;
        p->pos++;
        if (p->pos >= p->len || !is_digit(p->text[p->pos])) return -EINVAL;
        while (p->pos < p->len && is_digit(p->text[p->pos])) p->pos++;
    }
    if (p->pos < p->len && (p->text[p->pos] == 'e' || p->text[p->pos] == 'E')) {
        integral = false;
        p->pos++;
        if (p->pos < p->len && (p->text[p->pos] == '+' || p->text[p->pos] == '-')) p->pos++;
        if (p->pos >= p->len || !is_digit(p->text[p->pos])) return -EINVAL;
        while (p->pos < p->len && is_digit(p->text[p->pos])) p->pos++;
    }
    pa__json_node_t *node = &p->doc->nodes[*index];
    if (integral && !overflow && (!negative || magnitude <= (uint64_t)INT64_MAX + 1)) {
        node->integral = true;
        if (negative) {
            node->negative = magnitude != 0;
            /* -2^63 has no positive int64; the unsigned negation is exact modulo 2^64 */
            node->i64 = magnitude == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)magnitude;
            node->number = -(double)magnitude;
        } else {
            node->u64 = magnitude;
            node->i64 = magnitude <= (uint64_t)INT64_MAX ? (int64_t)magnitude : 0;
            node->number = (double)magnitude; /* correctly rounded conversion */
        }
        return 0;
    }
    /* A fraction, an exponent or more than 64 bits: strtod on a terminated copy, in the C
     * locale (the grammar was checked above, so strtod sees nothing it would read
     * differently: no hex, no inf/nan, no locale decimal point). */
    size_t n = p->pos - start;
    char small[64];
    char *copy = n < sizeof small ? small : malloc(n + 1);
    if (!copy) return -ENOMEM;
    memcpy(copy, p->text + start, n);
    copy[n] = '\0';
    locale_t c = c_locale_get();
    if (!c) {
        if (copy != small) free(copy);
        return -ENOMEM;
    }
    locale_t old = uselocale(c);
    double value = strtod(copy, NULL);
    uselocale(old);
    if (copy != small) free(copy);
    if (isinf(value)) return -ERANGE;
    node->number = value;
    return 0;
}

static int parse_literal(parser_t *p, const char *word, uint8_t type, size_t *index) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->text + p->pos, word, n) != 0) return -EINVAL;
    p->pos += n;
    return new_node(p, type, index);
}

static int parse_value(parser_t *p, int depth, size_t *index);

/* An array or object at p->pos; depth is that of the container's contents. */
static int parse_container(parser_t *p, int depth, bool object, size_t *index) {
    if (depth > PA__JSON_MAX_DEPTH) return -ELOOP;
    int rc = new_node(p, object ? PA__JSON_OBJECT : PA__JSON_ARRAY, index);
    if (rc) return rc;
    unsigned char close = object ? '}' : ']';
    p->pos++;
    skip_ws(p);
    uint32_t count = 0;
    if (p->pos < p->len && p->text[p->pos] == close) {
        p->pos++;
    } else {
        for (;;) {
            size_t child;
            if (object) {
                skip_ws(p);
                if (p->pos >= p->len || p->text[p->pos] != '"') return -EINVAL;
                if ((rc = parse_string(p, &child))) return rc;
                skip_ws(p);
                if (p->pos >= p->len || p->text[p->pos] != ':') return -EINVAL;
                p->pos++;
            }
            if ((rc = parse_value(p, depth, &child))) return rc;
            count++;
            skip_ws(p);
            if (p->pos >= p->len) return -EINVAL;
            unsigned char c = p->text[p->pos++];
            if (c == close) break;
            if (c != ',') return -EINVAL;
        }
    }
    pa__json_node_t *node = &p->doc->nodes[*index];
    node->count = count;
    node->span = (uint32_t)(p->doc->count - *index);
    return 0;
}

static int parse_value(parser_t *p, int depth, size_t *index) {
    skip_ws(p);
    if (p->pos >= p->len) return -EINVAL;
    unsigned char c = p->text[p->pos];
    switch (c) {
    case '{': return parse_container(p, depth + 1, true, index);
    case '[': return parse_container(p, depth + 1, false, index);
    case '"': return parse_string(p, index);
    case 't': return parse_literal(p, "true", PA__JSON_TRUE, index);
    case 'f': return parse_literal(p, "false", PA__JSON_FALSE, index);
    case 'n': return parse_literal(p, "null", PA__JSON_NULL, index);
    default:
        if (c == '-' || is_digit(c)) return parse_number(p, index);
        return -EINVAL;
    }
}

int pa__json_parse(const char *text, size_t len, pa__json_doc_t *doc, size_t *error_offset) {
    if (error_offset) *error_offset = 0;
    if (!doc) return -EINVAL;
    memset(doc, 0, sizeof *doc);
    if (!text && len) return -EINVAL;
    if (len > PA__JSON_MAX_INPUT) return -EMSGSIZE;
    /* Decoded strings never outgrow their source (see the header), so len + 1 bytes hold
     * them all; +1 keeps the empty input's allocation non-zero. */
    doc->strings = malloc(len + 1);
    if (!doc->strings) return -ENOMEM;
    parser_t p = {.text = (const unsigned char *)text, .len = len, .doc = doc};
    size_t root;
    int rc = len ? parse_value(&p, 0, &root) : -EINVAL;
    if (!rc) {
        skip_ws(&p);
        if (p.pos != p.len) rc = -EINVAL; /* something after the value */
    }
    if (error_offset) *error_offset = p.pos;
    if (rc) pa__json_doc_free(doc);
    return rc;
}

void pa__json_doc_free(pa__json_doc_t *doc) {
    if (!doc) return;
    free(doc->nodes);
    free(doc->strings);
    memset(doc, 0, sizeof *doc);
}

const pa__json_node_t *pa__json_get(const pa__json_doc_t *doc, const pa__json_node_t *obj, const char *key) {
    if (!doc || !obj || !key || obj->type != PA__JSON_OBJECT) return NULL;
    size_t klen = strlen(key);
    const pa__json_node_t *found = NULL, *member = obj + 1;
    for (uint32_t i = 0; i < obj->count; i++) {
        const pa__json_node_t *value = member + 1; /* a key is a string: span 1 */
        if (member->count == klen && memcmp(member->str, key, klen) == 0) found = value;
        member = pa__json_next(value);
    }
    return found;
}

const pa__json_node_t *pa__json_at(const pa__json_doc_t *doc, const pa__json_node_t *arr, size_t i) {
    if (!doc || !arr || arr->type != PA__JSON_ARRAY || i >= arr->count) return NULL;
    const pa__json_node_t *node = arr + 1;
    while (i--) node = pa__json_next(node);
    return node;
}

int pa__json_u64(const pa__json_node_t *node, uint64_t *out) {
    if (!node) return -ENOENT;
    if (node->type != PA__JSON_NUMBER || !node->integral || node->negative) return -EINVAL;
    *out = node->u64;
    return 0;
}

int pa__json_i64(const pa__json_node_t *node, int64_t *out) {
    if (!node) return -ENOENT;
    if (node->type != PA__JSON_NUMBER || !node->integral) return -EINVAL;
    if (!node->negative && node->u64 > (uint64_t)INT64_MAX) return -EINVAL;
    *out = node->i64;
    return 0;
}

int pa__json_double(const pa__json_node_t *node, double *out) {
    if (!node) return -ENOENT;
    if (node->type != PA__JSON_NUMBER) return -EINVAL;
    *out = node->number;
    return 0;
}

int pa__json_bool(const pa__json_node_t *node, bool *out) {
    if (!node) return -ENOENT;
    if (node->type != PA__JSON_TRUE && node->type != PA__JSON_FALSE) return -EINVAL;
    *out = node->type == PA__JSON_TRUE;
    return 0;
}

/* ---- writer ---- */

void pa__jw_init(pa__jw_t *w, char *buf, size_t capacity) {
    memset(w, 0, sizeof *w);
    w->buf = buf;
    w->capacity = capacity;
    if (!buf && capacity) w->error = -EINVAL;
    if (buf && capacity) buf[0] = '\0';
}

static void put(pa__jw_t *w, const char *s, size_t n) {
    if (w->error) return;
    /* keep one byte for the NUL so the text is always terminated */
    if (n >= w->capacity - w->len || w->capacity == 0) {
        w->error = -EMSGSIZE;
        return;
    }
    memcpy(w->buf + w->len, s, n);
    w->len += n;
    w->buf[w->len] = '\0';
}

static void fail(pa__jw_t *w, int rc) {
    if (!w->error) w->error = rc;
}

/* Before a value: a comma after a sibling, nothing after a key; a value where a key is
 * due, or a second top-level value, is a misuse. */
static void before_value(pa__jw_t *w) {
    if (w->error) return;
    if (w->depth == 0) {
        if (w->len) fail(w, -EINVAL);
        return;
    }
    uint64_t bit = 1ull << w->depth;
    if (w->in_object & bit) {
        if (!w->key_pending) fail(w, -EINVAL);
        w->key_pending = false;
        return;
    }
    if (w->has_items & bit) put(w, ",", 1);
    w->has_items |= bit;
}

static void begin(pa__jw_t *w, bool object) {
    before_value(w);
    if (w->error) return;
    if (w->depth >= PA__JSON_MAX_DEPTH) {
        fail(w, -EINVAL);
        return;
    }
    put(w, object ? "{" : "[", 1);
    w->depth++;
    uint64_t bit = 1ull << w->depth;
    w->has_items &= ~bit;
    if (object) w->in_object |= bit;
    else w->in_object &= ~bit;
}

static void end(pa__jw_t *w, bool object) {
    if (w->error) return;
    uint64_t bit = 1ull << w->depth;
    if (w->depth == 0 || !!(w->in_object & bit) != object || w->key_pending) {
        fail(w, -EINVAL);
        return;
    }
    put(w, object ? "}" : "]", 1);
    w->depth--;
}

void pa__jw_object_begin(pa__jw_t *w) { begin(w, true); }
void pa__jw_object_end(pa__jw_t *w) { end(w, true); }
void pa__jw_array_begin(pa__jw_t *w) { begin(w, false); }
void pa__jw_array_end(pa__jw_t *w) { end(w, false); }

static void put_escaped(pa__jw_t *w, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    put(w, "\"", 1);
    size_t run = 0; /* start of the bytes copied as they are */
    for (size_t i = 0; i < n && !w->error;) {
        unsigned char c = u[i];
        if (c >= 0x80) {
            size_t seq = utf8_sequence(u + i, n - i);
            if (!seq) {
                fail(w, -EINVAL);
                return;
            }
            i += seq;
            continue;
        }
        if (c >= 0x20 && c != '"' && c != '\\') {
            i++;
            continue;
        }
        put(w, s + run, i - run);
        char esc[8];
        if (c == '"') memcpy(esc, "\\\"", 3);
        else if (c == '\\') memcpy(esc, "\\\\", 3);
        else if (c == '\n') memcpy(esc, "\\n", 3);
        else if (c == '\t') memcpy(esc, "\\t", 3);
        else if (c == '\r') memcpy(esc, "\\r", 3);
        else snprintf(esc, sizeof esc, "\\u%04x", c);
        put(w, esc, strlen(esc));
        run = ++i;
    }
    put(w, s + run, n - run);
    put(w, "\"", 1);
}

void pa__jw_key(pa__jw_t *w, const char *key) {
    if (w->error) return;
    uint64_t bit = 1ull << w->depth;
    if (!key || w->depth == 0 || !(w->in_object & bit) || w->key_pending) {
        fail(w, -EINVAL);
        return;
    }
    if (w->has_items & bit) put(w, ",", 1);
    w->has_items |= bit;
    put_escaped(w, key, strlen(key));
    put(w, ":", 1);
    w->key_pending = true;
}

void pa__jw_string_n(pa__jw_t *w, const char *s, size_t n) {
    if (!s && n) {
        fail(w, -EINVAL);
        return;
    }
    before_value(w);
    put_escaped(w, s ? s : "", n);
}

void pa__jw_string(pa__jw_t *w, const char *s) {
    if (!s) {
        fail(w, -EINVAL);
        return;
    }
    pa__jw_string_n(w, s, strlen(s));
}

static void put_u64(pa__jw_t *w, uint64_t v, bool minus) {
    char digits[24];
    size_t i = sizeof digits;
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (minus) digits[--i] = '-';
    put(w, digits + i, sizeof digits - i);
}

void pa__jw_u64(pa__jw_t *w, uint64_t v) {
    before_value(w);
    put_u64(w, v, false);
}

void pa__jw_i64(pa__jw_t *w, int64_t v) {
    before_value(w);
    /* the magnitude in unsigned arithmetic: -INT64_MIN overflows int64 */
    put_u64(w, v < 0 ? 0 - (uint64_t)v : (uint64_t)v, v < 0);
}

void pa__jw_double(pa__jw_t *w, double v) {
    if (!isfinite(v)) {
        fail(w, -EINVAL);
        return;
    }
    before_value(w);
    if (w->error) return;
    locale_t c = c_locale_get();
    if (!c) {
        fail(w, -ENOMEM);
        return;
    }
    char text[40];
    locale_t old = uselocale(c);
    int n = snprintf(text, sizeof text, "%.17g", v);
    uselocale(old);
    if (n <= 0 || (size_t)n >= sizeof text) {
        fail(w, -EINVAL);
        return;
    }
    put(w, text, (size_t)n);
}

void pa__jw_bool(pa__jw_t *w, bool v) {
    before_value(w);
    put(w, v ? "true" : "false", v ? 4 : 5);
}

void pa__jw_null(pa__jw_t *w) {
    before_value(w);
    put(w, "null", 4);
}

int pa__jw_finish(pa__jw_t *w, size_t *len) {
    if (!w) return -EINVAL;
    if (w->error) return w->error;
    if (w->depth != 0 || w->len == 0) return -EINVAL;
    if (len) *len = w->len;
    return 0;
}
