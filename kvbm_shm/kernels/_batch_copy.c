/* Batched host-memory copy with non-temporal stores: see kvbm_shm/kernels/cpu_copy.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_SSE2 1
#endif

/* Below this size a copy goes through the cache (memcpy); above it, stores bypass the cache:
   the destination of a KV block copy is not read again soon, and skipping the read-for-ownership
   of every destination line roughly doubles the bandwidth of chunked copies. */
#define STREAM_MIN_BYTES 4096

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

static PyObject *copy_batch(PyObject *self, PyObject *args)
{
    Py_buffer dst, src, size;
    if (!PyArg_ParseTuple(args, "y*y*y*", &dst, &src, &size))
        return NULL;
    PyObject *result = NULL;
    if (dst.len != src.len || dst.len != size.len || dst.len % 8) {
        PyErr_SetString(PyExc_ValueError, "dst, src and size must be uint64 arrays of one length");
        goto done;
    }
    const uint64_t *d = dst.buf, *s = src.buf, *z = size.buf;
    Py_ssize_t n = dst.len / 8;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        copy_one((char *)(uintptr_t)d[i], (const char *)(uintptr_t)s[i], (size_t)z[i]);
#ifdef HAVE_SSE2
    _mm_sfence();
#endif
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    PyBuffer_Release(&size);
    return result;
}

static PyMethodDef methods[] = {
    {"copy_batch", copy_batch, METH_VARARGS,
     "copy_batch(dst, src, size): copy size[i] bytes from address src[i] to dst[i] for every i "
     "(uint64 arrays), without the GIL, streaming large copies past the cache."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_batch_copy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__batch_copy(void) { return PyModule_Create(&module); }
