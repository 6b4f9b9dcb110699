/* Batched host-memory copies with non-temporal stores, and the block checksum computed in the
   same pass. The contract is in kvbm_shm/kernels/cpu_copy.py; the checksum is defined here.

   Block checksum (64-bit) of n bytes: the bytes are read as 16-byte little-endian words w_0..w_m-1
   (the last one zero-padded), each split into two 64-bit lanes. Per lane, with wrapping adds,
       A = sum of w_j            B = sum over j of (A after adding w_j)
   so A catches any changed word and B any word moved to another position. The result mixes
   A0, A1, B0, B1 and n with the murmur3 64-bit finaliser. It guards against corruption, not
   against an adversary. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_SSE2 1
#endif

#define STREAM_MIN_BYTES 4096

/* ---------------------------------------------------------------- checksum state */

typedef struct { uint64_t a0, a1, b0, b1; } sum_state;

static inline void sum_word(sum_state *s, uint64_t lo, uint64_t hi)
{
    s->a0 += lo; s->a1 += hi;
    s->b0 += s->a0; s->b1 += s->a1;
}

static inline uint64_t fmix64(uint64_t k)
{
    k ^= k >> 33; k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static uint64_t sum_final(const sum_state *s, uint64_t nbytes)
{
    uint64_t h = fmix64(nbytes ^ 0x9e3779b97f4a7c15ULL);
    h = fmix64(h ^ s->a0);
    h = fmix64(h ^ s->a1);
    h = fmix64(h ^ s->b0);
    return fmix64(h ^ s->b1);
}

/* Sum whole 16-byte words of src (n a multiple of 16), copying them to dst when dst != NULL. */
static void copy_sum_words(char *dst, const char *src, size_t n, sum_state *s)
{
#ifdef HAVE_SSE2
    __m128i a = _mm_set_epi64x((long long)s->a1, (long long)s->a0);
    __m128i b = _mm_set_epi64x((long long)s->b1, (long long)s->b0);
    int stream = dst && n >= STREAM_MIN_BYTES && ((uintptr_t)dst & 15) == 0;
    for (size_t i = 0; i < n; i += 16) {
        __m128i w = _mm_loadu_si128((const __m128i *)(src + i));
        a = _mm_add_epi64(a, w);
        b = _mm_add_epi64(b, a);
        if (stream)
            _mm_stream_si128((__m128i *)(dst + i), w);
        else if (dst)
            _mm_storeu_si128((__m128i *)(dst + i), w);
    }
    uint64_t out[4];
    _mm_storeu_si128((__m128i *)out, a);
    _mm_storeu_si128((__m128i *)(out + 2), b);
    s->a0 = out[0]; s->a1 = out[1]; s->b0 = out[2]; s->b1 = out[3];
#else
    for (size_t i = 0; i < n; i += 16) {
        uint64_t w[2];
        memcpy(w, src + i, 16);
        sum_word(s, w[0], w[1]);
    }
    if (dst)
        memcpy(dst, src, n);
#endif
}

static void sum_tail(const char *src, size_t n, sum_state *s)
{
    uint64_t w[2] = {0, 0};
    memcpy(w, src, n);
    sum_word(s, w[0], w[1]);
}

/* ---------------------------------------------------------------- plain copy */

static void copy_one(char *dst, const char *src, size_t n)
{
#ifdef HAVE_SSE2
    if (n >= STREAM_MIN_BYTES) {
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
        memcpy(dst, src, head);
        dst += head; src += head; n -= head;
        for (; n >= 64; n -= 64, src += 64, dst += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)src);
            __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
            _mm_stream_si128((__m128i *)dst, a);
            _mm_stream_si128((__m128i *)(dst + 16), b);
            _mm_stream_si128((__m128i *)(dst + 32), c);
            _mm_stream_si128((__m128i *)(dst + 48), d);
        }
    }
#endif
    memcpy(dst, src, n);
}

static void fence(void)
{
#ifdef HAVE_SSE2
    _mm_sfence();
#endif
}

/* ---------------------------------------------------------------- Python API */

static int u64_arrays(Py_buffer *bufs, int count, Py_ssize_t *n)
{
    for (int i = 0; i < count; i++) {
        if (bufs[i].len % 8 || (i && bufs[i].len != bufs[0].len)) {
            PyErr_SetString(PyExc_ValueError, "address and size arrays must be uint64 arrays of one length");
            return -1;
        }
    }
    *n = bufs[0].len / 8;
    return 0;
}

static void release(Py_buffer *bufs, int count)
{
    for (int i = 0; i < count; i++)
        PyBuffer_Release(&bufs[i]);
}

static PyObject *copy_batch(PyObject *self, PyObject *args)
{
    Py_buffer b[3];
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*", &b[0], &b[1], &b[2]))
        return NULL;
    if (u64_arrays(b, 3, &n) < 0) {
        release(b, 3);
        return NULL;
    }
    const uint64_t *d = b[0].buf, *s = b[1].buf, *z = b[2].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        copy_one((char *)(uintptr_t)d[i], (const char *)(uintptr_t)s[i], (size_t)z[i]);
    fence();
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

/* copy_sum_batch(dst, src, size, block_starts, sums): copies as copy_batch; copies
   block_starts[k] .. block_starts[k+1]-1 form block k (in block byte order) and sums[k] receives
   its checksum. Every size must be a multiple of 16 (the caller checks). */
static PyObject *copy_sum_batch(PyObject *self, PyObject *args)
{
    Py_buffer b[3], starts, sums;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*", &b[0], &b[1], &b[2], &starts, &sums))
        return NULL;
    PyObject *result = NULL;
    if (u64_arrays(b, 3, &n) < 0)
        goto done;
    Py_ssize_t blocks = sums.len / 8;
    if (sums.len % 8 || starts.len != sums.len + 8) {
        PyErr_SetString(PyExc_ValueError, "block_starts must have one more entry than sums (uint64)");
        goto done;
    }
    const uint64_t *d = b[0].buf, *s = b[1].buf, *z = b[2].buf, *st = starts.buf;
    uint64_t *out = sums.buf;
    if (st[0] != 0 || st[blocks] != (uint64_t)n) {
        PyErr_SetString(PyExc_ValueError, "block_starts must run from 0 to the number of copies");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (z[i] % 16) {
            PyErr_SetString(PyExc_ValueError, "copy_sum_batch needs copy sizes that are multiples of 16");
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < blocks; k++) {
        sum_state state = {0, 0, 0, 0};
        uint64_t nbytes = 0;
        for (uint64_t i = st[k]; i < st[k + 1]; i++) {
            copy_sum_words((char *)(uintptr_t)d[i], (const char *)(uintptr_t)s[i], (size_t)z[i], &state);
            nbytes += z[i];
        }
        out[k] = sum_final(&state, nbytes);
    }
    fence();
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release(b, 3);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&sums);
    return result;
}

static PyObject *checksum(PyObject *self, PyObject *args)
{
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    sum_state state = {0, 0, 0, 0};
    size_t whole = (size_t)data.len & ~(size_t)15;
    Py_BEGIN_ALLOW_THREADS
    copy_sum_words(NULL, data.buf, whole, &state);
    if (whole < (size_t)data.len)
        sum_tail((const char *)data.buf + whole, (size_t)data.len - whole, &state);
    Py_END_ALLOW_THREADS
    uint64_t h = sum_final(&state, (uint64_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef methods[] = {
    {"copy_batch", copy_batch, METH_VARARGS,
     "copy_batch(dst, src, size): copy size[i] bytes from address src[i] to dst[i] (uint64 arrays)."},
    {"copy_sum_batch", copy_sum_batch, METH_VARARGS,
     "copy_sum_batch(dst, src, size, block_starts, sums): copy_batch, and the checksum of each block."},
    {"checksum", checksum, METH_VARARGS, "checksum(buffer) -> int: the block checksum of a buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_batch_copy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__batch_copy(void) { return PyModule_Create(&module); }
