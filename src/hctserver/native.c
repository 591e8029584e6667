/* hctserver.native: compiled twins of the hot loops in position.py, wire.py
 * and patchset.py. Optional: the package works without it, and
 * HCTSERVER_PURE=1 makes it ignore this module (see speedups.py).
 *
 * Every function here must return what its pure-Python twin returns, byte
 * for byte; where the input is unusual (an error, a type the twin handles
 * specially) it stops and leaves the work to the twin, so that errors are
 * raised by one implementation only. tests/test_speedups.py runs both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Append a new reference to a list and drop it; -1 on error (item NULL too). */
static int append_new(PyObject *list, PyObject *item) {
    if (!item) return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* A tuple of type tp (a namedtuple) from n new references, which it steals;
 * NULL (and all of them dropped) if any is NULL or allocation fails. */
static PyObject *new_tuple(PyTypeObject *tp, Py_ssize_t n, PyObject **items) {
    PyObject *t = NULL;
    int ok = 1;
    for (Py_ssize_t i = 0; i < n; i++) ok = ok && items[i] != NULL;
    if (ok) t = tp->tp_alloc(tp, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (t)
            PyTuple_SET_ITEM(t, i, items[i]);
        else
            Py_XDECREF(items[i]);
    }
    return t;
}

/* --- MD5 (RFC 1321) ---------------------------------------------------- */

typedef struct {
    uint32_t s[4];
    uint64_t len;
    unsigned char buf[64];
    size_t n;
} md5_ctx;

#define ROTL(x, c) (((x) << (c)) | ((x) >> (32 - (c))))

static const uint32_t K[64] = {
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391};


#define MD5_STEP(f, a, b, c, d, x, t, r) \
    a += f(b, c, d) + (x) + (t);          \
    a = ROTL(a, r) + b;
#define MD5_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define MD5_G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define MD5_H(x, y, z) ((x) ^ (y) ^ (z))
#define MD5_I(x, y, z) ((y) ^ ((x) | ~(z)))

/* one 64-byte block, unrolled: the four rounds of RFC 1321 (section 3.4) */
static void md5_block(uint32_t *s, const unsigned char *p) {
    uint32_t m[16], a = s[0], b = s[1], c = s[2], d = s[3];
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)p[4 * i] | ((uint32_t)p[4 * i + 1] << 8) | ((uint32_t)p[4 * i + 2] << 16) |
               ((uint32_t)p[4 * i + 3] << 24);
    for (int i = 0; i < 16; i += 4) {
        MD5_STEP(MD5_F, a, b, c, d, m[i], K[i], 7)
        MD5_STEP(MD5_F, d, a, b, c, m[i + 1], K[i + 1], 12)
        MD5_STEP(MD5_F, c, d, a, b, m[i + 2], K[i + 2], 17)
        MD5_STEP(MD5_F, b, c, d, a, m[i + 3], K[i + 3], 22)
    }
    for (int i = 16; i < 32; i += 4) {
        MD5_STEP(MD5_G, a, b, c, d, m[(5 * i + 1) & 15], K[i], 5)
        MD5_STEP(MD5_G, d, a, b, c, m[(5 * i + 6) & 15], K[i + 1], 9)
        MD5_STEP(MD5_G, c, d, a, b, m[(5 * i + 11) & 15], K[i + 2], 14)
        MD5_STEP(MD5_G, b, c, d, a, m[(5 * i + 16) & 15], K[i + 3], 20)
    }
    for (int i = 32; i < 48; i += 4) {
        MD5_STEP(MD5_H, a, b, c, d, m[(3 * i + 5) & 15], K[i], 4)
        MD5_STEP(MD5_H, d, a, b, c, m[(3 * i + 8) & 15], K[i + 1], 11)
        MD5_STEP(MD5_H, c, d, a, b, m[(3 * i + 11) & 15], K[i + 2], 16)
        MD5_STEP(MD5_H, b, c, d, a, m[(3 * i + 14) & 15], K[i + 3], 23)
    }
    for (int i = 48; i < 64; i += 4) {
        MD5_STEP(MD5_I, a, b, c, d, m[(7 * i) & 15], K[i], 6)
        MD5_STEP(MD5_I, d, a, b, c, m[(7 * i + 7) & 15], K[i + 1], 10)
        MD5_STEP(MD5_I, c, d, a, b, m[(7 * i + 14) & 15], K[i + 2], 15)
        MD5_STEP(MD5_I, b, c, d, a, m[(7 * i + 21) & 15], K[i + 3], 21)
    }
    s[0] += a;
    s[1] += b;
    s[2] += c;
    s[3] += d;
}

static void md5_init(md5_ctx *x) {
    x->s[0] = 0x67452301;
    x->s[1] = 0xefcdab89;
    x->s[2] = 0x98badcfe;
    x->s[3] = 0x10325476;
    x->len = 0;
    x->n = 0;
}

static void md5_update(md5_ctx *x, const unsigned char *p, size_t n) {
    x->len += n;
    if (x->n) {
        size_t k = 64 - x->n < n ? 64 - x->n : n;
        memcpy(x->buf + x->n, p, k);
        x->n += k;
        p += k;
        n -= k;
        if (x->n < 64) return;
        md5_block(x->s, x->buf);
        x->n = 0;
    }
    while (n >= 64) {
        md5_block(x->s, p);
        p += 64;
        n -= 64;
    }
    memcpy(x->buf, p, n);
    x->n = n;
}

static void md5_final(md5_ctx *x, unsigned char *out) {
    uint64_t bits = x->len * 8;
    static const unsigned char pad[64] = {0x80};
    unsigned char lenle[8];
    for (int i = 0; i < 8; i++) lenle[i] = (unsigned char)(bits >> (8 * i));
    size_t k = x->n < 56 ? 56 - x->n : 120 - x->n;
    md5_update(x, pad, k);
    md5_update(x, lenle, 8);
    for (int i = 0; i < 4; i++) {
        out[4 * i] = (unsigned char)x->s[i];
        out[4 * i + 1] = (unsigned char)(x->s[i] >> 8);
        out[4 * i + 2] = (unsigned char)(x->s[i] >> 16);
        out[4 * i + 3] = (unsigned char)(x->s[i] >> 24);
    }
}

static void put_be64(unsigned char *p, int64_t v) {
    uint64_t u = (uint64_t)v;
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)u;
        u >>= 8;
    }
}

static void hash_entry(int64_t cid, const char *s, Py_ssize_t slen, const char *d, Py_ssize_t dlen,
                       int64_t schemacid, unsigned char *out) {
    md5_ctx x;
    unsigned char b[8];
    md5_init(&x);
    put_be64(b, cid);
    md5_update(&x, b, 8);
    md5_update(&x, (const unsigned char *)s, (size_t)slen);
    md5_update(&x, (const unsigned char *)d, (size_t)dlen);
    put_be64(b, schemacid);
    md5_update(&x, b, 8);
    md5_final(&x, out);
}

static void hash_fold(const unsigned char *h, const unsigned char *eh, unsigned char *out) {
    md5_ctx x;
    md5_init(&x);
    md5_update(&x, h, 16);
    md5_update(&x, eh, 16);
    md5_final(&x, out);
}

/* --- position.py ------------------------------------------------------- */

static int schema_bytes(PyObject *schema, const char **s, Py_ssize_t *n) {
    if (PyUnicode_Check(schema)) {
        *s = PyUnicode_AsUTF8AndSize(schema, n);
        return *s ? 0 : -1;
    }
    if (PyBytes_Check(schema)) {
        *s = PyBytes_AS_STRING(schema);
        *n = PyBytes_GET_SIZE(schema);
        return 0;
    }
    PyErr_SetString(PyExc_TypeError, "schema must be str or bytes");
    return -1;
}

static PyObject *md5_digest(PyObject *self, PyObject *arg) {
    Py_buffer b;
    unsigned char out[16];
    md5_ctx x;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    md5_init(&x);
    md5_update(&x, b.buf, (size_t)b.len);
    md5_final(&x, out);
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *entry_hash(PyObject *self, PyObject *args) {
    long long cid, schemacid;
    PyObject *schema;
    Py_buffer d;
    const char *s;
    Py_ssize_t slen;
    unsigned char out[16];
    if (!PyArg_ParseTuple(args, "LOy*L", &cid, &schema, &d, &schemacid)) return NULL;
    if (schema_bytes(schema, &s, &slen) < 0) {
        PyBuffer_Release(&d);
        return NULL;
    }
    hash_entry(cid, s, slen, d.buf, d.len, schemacid, out);
    PyBuffer_Release(&d);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *fold(PyObject *self, PyObject *args) {
    Py_buffer h, e;
    md5_ctx x;
    unsigned char out[16];
    if (!PyArg_ParseTuple(args, "y*y*", &h, &e)) return NULL;
    md5_init(&x);
    md5_update(&x, h.buf, (size_t)h.len);
    md5_update(&x, e.buf, (size_t)e.len);
    md5_final(&x, out);
    PyBuffer_Release(&h);
    PyBuffer_Release(&e);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

typedef struct {
    int64_t cid, schemacid;
    const char *s, *d;
    Py_ssize_t slen, dlen;
    int ok;
    unsigned char eh[16], vh[16];
} job;

/* chain(entries, cid, h, tag): see position.chain. The hashing runs
 * without the GIL: another thread's Python (the apply loop) goes on. */
static PyObject *chain(PyObject *self, PyObject *args) {
    PyObject *entries, *tag, *seq = NULL, *out = NULL, *res = NULL;
    long long cid;
    Py_buffer h0;
    job *jobs = NULL;
    if (!PyArg_ParseTuple(args, "OLy*O", &entries, &cid, &h0, &tag)) return NULL;
    if (h0.len != 16) {
        PyErr_SetString(PyExc_ValueError, "the version hash must be 16 bytes");
        PyBuffer_Release(&h0);
        return NULL;
    }
    seq = PySequence_Tuple(entries); /* holds every entry (and so its bytes) alive */
    if (!seq) goto done;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    jobs = PyMem_Malloc(sizeof(job) * (n ? n : 1));
    if (!jobs) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t nxt = cid + 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyTuple_GET_ITEM(seq, i);
        job *j = &jobs[i];
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 4) {
            PyErr_SetString(PyExc_TypeError, "chain takes Entry tuples");
            goto done;
        }
        j->cid = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 0));
        j->schemacid = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
        if (PyErr_Occurred()) goto done;
        j->ok = j->cid == nxt;
        if (!j->ok) continue;
        nxt++;
        PyObject *schema = PyTuple_GET_ITEM(e, 2), *data = PyTuple_GET_ITEM(e, 3);
        if (!PyUnicode_Check(schema)) {
            PyErr_SetString(PyExc_TypeError, "an entry's schema must be str");
            goto done;
        }
        if (schema_bytes(schema, &j->s, &j->slen) < 0) goto done;
        if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "an entry's data must be bytes");
            goto done;
        }
        j->d = PyBytes_AS_STRING(data);
        j->dlen = PyBytes_GET_SIZE(data);
    }
    unsigned char h[16];
    memcpy(h, h0.buf, 16);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        job *j = &jobs[i];
        if (!j->ok) continue;
        hash_entry(j->cid, j->s, j->slen, j->d, j->dlen, j->schemacid, j->eh);
        hash_fold(h, j->eh, j->vh);
        memcpy(h, j->vh, 16);
    }
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item;
        if (jobs[i].ok) {
            item = Py_BuildValue("(y#y#O)", jobs[i].eh, (Py_ssize_t)16, jobs[i].vh, (Py_ssize_t)16,
                                 tag);
            if (!item) goto done;
        } else {
            item = Py_NewRef(Py_None);
        }
        PyList_SET_ITEM(out, i, item);
    }
    res = Py_BuildValue("(OLy#)", out, (long long)(nxt - 1), h, (Py_ssize_t)16);
done:
    PyBuffer_Release(&h0);
    PyMem_Free(jobs);
    Py_XDECREF(seq);
    Py_XDECREF(out);
    return res;
}

/* journal_rows(entries, hashes) -> (rows, nbytes, schema_at, tag): see
 * apply.py_journal_rows. Every hash must be present (a contiguous run). */
static PyObject *journal_rows(PyObject *self, PyObject *args) {
    PyObject *entries, *hashes, *es = NULL, *hs = NULL, *rows = NULL, *res = NULL;
    if (!PyArg_ParseTuple(args, "OO", &entries, &hashes)) return NULL;
    es = PySequence_Fast(entries, "entries must be a sequence");
    hs = es ? PySequence_Fast(hashes, "hashes must be a sequence") : NULL;
    if (!hs) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(es);
    if (PySequence_Fast_GET_SIZE(hs) != n) {
        PyErr_SetString(PyExc_ValueError, "one hash per entry");
        goto done;
    }
    rows = PyList_New(n);
    if (!rows) goto done;
    long long nbytes = 0;
    Py_ssize_t schema_at = -1;
    int tag = -2; /* no data yet; -1: mixed */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(es, i), *h = PySequence_Fast_GET_ITEM(hs, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 4 || !PyTuple_Check(h) ||
            PyTuple_GET_SIZE(h) < 2) {
            PyErr_SetString(PyExc_TypeError, "journal_rows takes Entry tuples and hash tuples");
            goto done;
        }
        PyObject *schema = PyTuple_GET_ITEM(e, 2), *data = PyTuple_GET_ITEM(e, 3);
        if (!PyUnicode_Check(schema) || !PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "an entry's schema must be str, its data bytes");
            goto done;
        }
        Py_ssize_t slen = PyUnicode_GET_LENGTH(schema), dlen = PyBytes_GET_SIZE(data);
        nbytes += slen + dlen;
        if (slen && schema_at < 0) schema_at = i;
        if (dlen) {
            int t = (unsigned char)PyBytes_AS_STRING(data)[0];
            if (tag == -2)
                tag = t;
            else if (tag != t)
                tag = -1;
        }
        PyObject *row = PyTuple_Pack(6, PyTuple_GET_ITEM(e, 0), schema, data, PyTuple_GET_ITEM(e, 1),
                                     PyTuple_GET_ITEM(h, 0), PyTuple_GET_ITEM(h, 1));
        if (!row) goto done;
        PyList_SET_ITEM(rows, i, row);
    }
    res = Py_BuildValue("(OLni)", rows, nbytes, schema_at, tag);
done:
    Py_XDECREF(es);
    Py_XDECREF(hs);
    Py_XDECREF(rows);
    return res;
}

/* --- wire.py ----------------------------------------------------------- */

static int64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return (int64_t)v;
}

/* decode_entries(buf, pos, max_size, Entry) -> (entries, pos): whole,
 * well-formed entries from pos on. Stops, leaving the rest to the twin
 * (ReplyDecoder._entries), at an incomplete entry, a size out of range
 * (including the end marker 0), a missing NUL or a schema that is not
 * UTF-8. */
static PyObject *decode_entries(PyObject *self, PyObject *args) {
    PyObject *bufobj, *etype, *out = NULL, *res = NULL;
    Py_ssize_t pos;
    long long maxsize;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "OnLO", &bufobj, &pos, &maxsize, &etype)) return NULL;
    if (!PyType_Check(etype) || !PyType_IsSubtype((PyTypeObject *)etype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "Entry must be a tuple type");
        return NULL;
    }
    if (PyObject_GetBuffer(bufobj, &b, PyBUF_SIMPLE) < 0) return NULL;
    PyTypeObject *tp = (PyTypeObject *)etype;
    const unsigned char *buf = b.buf;
    Py_ssize_t end = b.len, p = pos;
    out = PyList_New(0);
    if (!out || p < 0) goto done;
    while (end - p >= 4) {
        int32_t size = (int32_t)((uint32_t)buf[p] | ((uint32_t)buf[p + 1] << 8) |
                                 ((uint32_t)buf[p + 2] << 16) | ((uint32_t)buf[p + 3] << 24));
        if (size < 17 || (long long)size > maxsize) break;
        Py_ssize_t stop = p + 4 + size;
        if (stop > end) break;
        const unsigned char *nul = memchr(buf + p + 20, 0, (size_t)(stop - (p + 20)));
        if (!nul) break;
        Py_ssize_t slen = nul - (buf + p + 20);
        PyObject *schema = PyUnicode_DecodeUTF8((const char *)buf + p + 20, slen, NULL);
        if (!schema) {
            PyErr_Clear();
            break;
        }
        PyObject *items[4] = {
            PyLong_FromLongLong(le64(buf + p + 4)), PyLong_FromLongLong(le64(buf + p + 12)), schema,
            PyBytes_FromStringAndSize((const char *)nul + 1, stop - (nul + 1 - buf))};
        if (append_new(out, new_tuple(tp, 4, items)) < 0) goto done;
        p = stop;
    }
    res = Py_BuildValue("(On)", out, p);
done:
    PyBuffer_Release(&b);
    Py_XDECREF(out);
    return res;
}

/* --- patchset.py ------------------------------------------------------- */

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} sbuf;

static int sb_grow(sbuf *s, Py_ssize_t more) {
    if (s->n + more <= s->cap) return 0;
    Py_ssize_t cap = (s->cap ? s->cap * 2 : 256);
    while (cap < s->n + more) cap *= 2;
    char *p = PyMem_Realloc(s->p, (size_t)cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    s->p = p;
    s->cap = cap;
    return 0;
}

static int sb_varint(sbuf *s, uint64_t v) {
    unsigned char t[9];
    int n;
    if (sb_grow(s, 9) < 0) return -1;
    if (v <= 0x7f) {
        s->p[s->n++] = (char)v;
        return 0;
    }
    if (v > 0x00FFFFFFFFFFFFFFULL) {
        t[8] = (unsigned char)v;
        v >>= 8;
        for (int i = 7; i >= 0; i--) {
            t[i] = (unsigned char)((v & 0x7f) | 0x80);
            v >>= 7;
        }
        n = 9;
    } else {
        unsigned char r[9];
        int k = 0;
        while (v) {
            r[k++] = (unsigned char)((v & 0x7f) | 0x80);
            v >>= 7;
        }
        r[0] &= 0x7f;
        for (int i = 0; i < k; i++) t[i] = r[k - 1 - i];
        n = k;
    }
    memcpy(s->p + s->n, t, (size_t)n);
    s->n += n;
    return 0;
}

static int sb_bytes(sbuf *s, char type, const char *p, Py_ssize_t n) {
    if (sb_grow(s, 1) < 0) return -1;
    s->p[s->n++] = type;
    if (sb_varint(s, (uint64_t)n) < 0 || sb_grow(s, n) < 0) return -1;
    memcpy(s->p + s->n, p, (size_t)n);
    s->n += n;
    return 0;
}

/* encode_values(values, UNDEFINED) -> bytes, or None for a value the
 * twin must handle (an int past 64 bits, a str with surrogates, another
 * type: the twin encodes it or raises). */
static PyObject *encode_values(PyObject *self, PyObject *args) {
    PyObject *values, *undef, *seq, *res = NULL;
    sbuf s = {NULL, 0, 0};
    if (!PyArg_ParseTuple(args, "OO", &values, &undef)) return NULL;
    seq = PySequence_Fast(values, "values must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        if (PyLong_CheckExact(v) || PyBool_Check(v)) {
            int overflow;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow || (x == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                goto fallback;
            }
            if (sb_grow(&s, 9) < 0) goto done;
            s.p[s.n++] = 1;
            put_be64((unsigned char *)s.p + s.n, x);
            s.n += 8;
        } else if (PyFloat_CheckExact(v)) {
            double d = PyFloat_AS_DOUBLE(v);
            int64_t bits;
            memcpy(&bits, &d, 8);
            if (sb_grow(&s, 9) < 0) goto done;
            s.p[s.n++] = 2;
            put_be64((unsigned char *)s.p + s.n, bits);
            s.n += 8;
        } else if (PyUnicode_CheckExact(v)) {
            Py_ssize_t len;
            const char *u = PyUnicode_AsUTF8AndSize(v, &len);
            if (!u) { /* surrogates: the twin encodes them with surrogatepass */
                PyErr_Clear();
                goto fallback;
            }
            if (sb_bytes(&s, 3, u, len) < 0) goto done;
        } else if (PyBytes_CheckExact(v)) {
            if (sb_bytes(&s, 4, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v)) < 0) goto done;
        } else if (v == Py_None || v == undef) {
            if (sb_grow(&s, 1) < 0) goto done;
            s.p[s.n++] = v == Py_None ? 5 : 0;
        } else {
            goto fallback;
        }
    }
    res = PyBytes_FromStringAndSize(s.p ? s.p : "", s.n);
    goto done;
fallback:
    res = Py_NewRef(Py_None);
done:
    PyMem_Free(s.p);
    Py_DECREF(seq);
    return res;
}

/* The end of a parse: release the input, drop the list, return res. */
static PyObject *finish(Py_buffer *b, PyObject *out, PyObject *res) {
    PyBuffer_Release(b);
    Py_XDECREF(out);
    return res;
}

/* --- hctformat.py ------------------------------------------------------ */

/* SQLite's varint, as patchset.get_varint reads it; -1 past the end. */
static int get_varint(const unsigned char *b, Py_ssize_t n, Py_ssize_t *p, uint64_t *out) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        if (*p >= n) return -1;
        unsigned char c = b[(*p)++];
        v = (v << 7) | (c & 0x7f);
        if (!(c & 0x80)) {
            *out = v;
            return 0;
        }
    }
    if (*p >= n) return -1;
    *out = (v << 8) | b[(*p)++];
    return 0;
}

/* hct_scan(data, RawOp) -> hctformat.scan's list, or None where the data is
 * malformed (the twin raises the error). */
static PyObject *hct_scan(PyObject *self, PyObject *args) {
    PyObject *data, *rawtype, *out = NULL;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "OO", &data, &rawtype)) return NULL;
    if (!PyType_Check(rawtype)) {
        PyErr_SetString(PyExc_TypeError, "RawOp must be a type");
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)rawtype;
    if (PyObject_GetBuffer(data, &b, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = b.buf;
    Py_ssize_t n = b.len, p = 0;
    out = PyList_New(0);
    if (!out) goto done;
    while (p < n) {
        if (buf[p] != 'T') goto malformed;
        const unsigned char *nul = memchr(buf + p + 1, 0, (size_t)(n - p - 1));
        if (!nul) goto malformed;
        PyObject *name = PyUnicode_DecodeUTF8((const char *)buf + p + 1, nul - buf - p - 1, NULL);
        if (!name) {
            PyErr_Clear();
            goto malformed;
        }
        PyObject *ops = PyList_New(0);
        PyObject *pair = ops ? PyTuple_Pack(2, name, ops) : NULL;
        Py_DECREF(name);
        Py_XDECREF(ops); /* the pair holds it */
        if (append_new(out, pair) < 0) goto done;
        p = nul - buf + 1;
        while (p < n && buf[p] != 'T') {
            unsigned char kind = buf[p++];
            uint64_t u = 0, size = 0;
            int has_rowid = kind == 'd' || kind == 'i';
            if (kind != 'd' && kind != 'i' && kind != 'I' && kind != 'D') goto malformed;
            if (has_rowid && get_varint(buf, n, &p, &u) < 0) goto malformed;
            if (kind != 'd') {
                if (get_varint(buf, n, &p, &size) < 0) goto malformed;
                if (size == 0 || size > (uint64_t)(n - p)) goto malformed;
            }
            PyObject *items[3] = {
                PyUnicode_FromOrdinal(kind),
                has_rowid ? PyLong_FromLongLong((long long)(int64_t)u) : Py_NewRef(Py_None),
                PyBytes_FromStringAndSize((const char *)buf + p, (Py_ssize_t)size)};
            p += (Py_ssize_t)size;
            if (append_new(ops, new_tuple(tp, 3, items)) < 0) goto done;
        }
    }
    return finish(&b, out, Py_NewRef(out));
malformed:
    return finish(&b, out, Py_NewRef(Py_None));
done:
    return finish(&b, out, NULL);
}

static const int INT_SIZES[7] = {0, 1, 2, 3, 4, 6, 8};

/* hct_record(rec) -> hctformat.decode_record's tuple, or None where the
 * record is malformed (the twin raises the error). */
static PyObject *hct_record(PyObject *self, PyObject *arg) {
    Py_buffer b;
    PyObject *out = NULL;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *r = b.buf;
    Py_ssize_t n = b.len, p = 0;
    uint64_t hsize;
    if (get_varint(r, n, &p, &hsize) < 0 || hsize == 0 || hsize > (uint64_t)n) goto malformed;
    out = PyList_New(0);
    if (!out) goto done;
    Py_ssize_t body = (Py_ssize_t)hsize;
    while (p < (Py_ssize_t)hsize) {
        uint64_t t;
        PyObject *v;
        if (get_varint(r, n, &p, &t) < 0) goto malformed;
        if (t == 0) {
            v = Py_NewRef(Py_None);
        } else if (t <= 6) {
            int k = INT_SIZES[t];
            if (body + k > n) goto malformed;
            int64_t x = (r[body] & 0x80) ? -1 : 0;
            for (int i = 0; i < k; i++) x = (int64_t)(((uint64_t)x << 8) | r[body + i]);
            body += k;
            v = PyLong_FromLongLong(x);
        } else if (t == 7) {
            if (body + 8 > n) goto malformed;
            uint64_t u = 0;
            for (int i = 0; i < 8; i++) u = (u << 8) | r[body + i];
            double d;
            memcpy(&d, &u, 8);
            body += 8;
            v = PyFloat_FromDouble(d);
        } else if (t == 8 || t == 9) {
            v = PyLong_FromLong((long)(t - 8));
        } else if (t >= 12) {
            uint64_t k = (t - 12) / 2;
            if (k > (uint64_t)(n - body)) goto malformed;
            if (t % 2 == 0)
                v = PyBytes_FromStringAndSize((const char *)r + body, (Py_ssize_t)k);
            else
                v = PyUnicode_DecodeUTF8((const char *)r + body, (Py_ssize_t)k, "replace");
            body += (Py_ssize_t)k;
        } else {
            goto malformed;
        }
        if (append_new(out, v) < 0) goto done;
    }
    return finish(&b, out, PyList_AsTuple(out));
malformed:
    return finish(&b, out, Py_NewRef(Py_None));
done:
    return finish(&b, out, NULL);
}

static PyMethodDef methods[] = {
    {"hct_scan", hct_scan, METH_VARARGS, "hct_scan(data, RawOp), as hctformat.scan"},
    {"hct_record", hct_record, METH_O, "hct_record(rec), as hctformat.decode_record"},
    {"md5", md5_digest, METH_O, "md5(data) -> 16-byte digest"},
    {"entry_hash", entry_hash, METH_VARARGS, "entry_hash(cid, schema, data, schemacid)"},
    {"fold", fold, METH_VARARGS, "fold(h, entry_hash) -> MD5(h || entry_hash)"},
    {"chain", chain, METH_VARARGS, "chain(entries, cid, h, tag), as position.chain"},
    {"journal_rows", journal_rows, METH_VARARGS, "journal_rows(entries, hashes)"},
    {"decode_entries", decode_entries, METH_VARARGS, "decode_entries(buf, pos, max_size, Entry)"},
    {"encode_values", encode_values, METH_VARARGS, "encode_values(values, UNDEFINED)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT,
                                    "hctserver.native",
                                    "Compiled twins of hctserver's hot loops.",
                                    -1,
                                    methods,
                                    NULL,
                                    NULL,
                                    NULL,
                                    NULL};

PyMODINIT_FUNC PyInit_native(void) { return PyModule_Create(&module); }
