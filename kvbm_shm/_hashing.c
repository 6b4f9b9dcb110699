/* Block identity in C. The contract is in kvbm_shm/hashing.py; `chain` computes exactly what
   its pure-Python path does.

   chain(tokens, page_size, prev) -> list of 16-byte digests
       h_i = XXH3-128(h_(i-1) || tokens of block i as little-endian uint32), h_-1 = prev, each
       digest in XXH3's canonical (big-endian) form; only full blocks. `tokens` is a list or
       tuple of ints (converted here, OverflowError outside [0, 2**32), TypeError for an item that
       is not an int) or a C-contiguous buffer of little-endian uint32 (bytes, numpy).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "_vendor/xxhash/xxhash.h"

#define HASH_BYTES 16

/* The value of an int held in one machine word by CPython (every token id), read without the
   generic conversion (a third of the time of a whole chain); 0 for other ints. */
static inline int compact_value(PyObject *item, long long *v)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)item))
        return 0;
    *v = (long long)PyUnstable_Long_CompactValue((PyLongObject *)item);
    return 1;
#else
    Py_ssize_t size = Py_SIZE(item);
    if (size < 0 || size > 1)
        return 0;
    *v = size ? (long long)((PyLongObject *)item)->ob_digit[0] : 0;
    return 1;
#endif
}

static int put_tokens(PyObject *const *items, Py_ssize_t n, unsigned char *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyLong_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "token ids must be ints");
            return -1;
        }
        int overflow = 0;
        long long v;
        if (compact_value(item, &v))  /* token ids are small ints: no generic conversion */
            ;
        else if ((v = PyLong_AsLongLongAndOverflow(item, &overflow)) == -1 && PyErr_Occurred())
            return -1;
        if (overflow || v < 0 || v > 0xFFFFFFFFLL) {
            PyErr_Format(PyExc_OverflowError, "token id %R out of bounds for uint32", item);
            return -1;
        }
        uint32_t t = (uint32_t)v;
        out[4 * i] = (unsigned char)t;
        out[4 * i + 1] = (unsigned char)(t >> 8);
        out[4 * i + 2] = (unsigned char)(t >> 16);
        out[4 * i + 3] = (unsigned char)(t >> 24);
    }
    return 0;
}

static PyObject *chain(PyObject *self, PyObject *args)
{
    PyObject *tokens, *seq = NULL, *result = NULL;
    Py_ssize_t page_size;
    Py_buffer prev, data = {0};
    unsigned char *scratch = NULL;
    if (!PyArg_ParseTuple(args, "Ony*", &tokens, &page_size, &prev))
        return NULL;
    PyObject *const *items = NULL;
    const unsigned char *raw = NULL;
    Py_ssize_t ntok;
    if (page_size <= 0) {
        PyErr_Format(PyExc_ValueError, "page_size must be positive, got %zd", page_size);
        goto done;
    }
    if (PyList_Check(tokens) || PyTuple_Check(tokens)) {
        seq = PySequence_Fast(tokens, "tokens");
        if (seq == NULL)
            goto done;
        ntok = PySequence_Fast_GET_SIZE(seq);
        items = PySequence_Fast_ITEMS(seq);
    } else {
        if (PyObject_GetBuffer(tokens, &data, PyBUF_SIMPLE) < 0)
            goto done;
        if (data.len % 4) {
            PyErr_SetString(PyExc_ValueError, "a token buffer holds whole little-endian uint32 values");
            goto done;
        }
        ntok = data.len / 4;
        raw = data.buf;
    }
    Py_ssize_t nblocks = ntok / page_size;
    size_t step = (size_t)page_size * 4;
    size_t head = (size_t)prev.len > HASH_BYTES ? (size_t)prev.len : HASH_BYTES;
    scratch = PyMem_Malloc(head + step);
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New(nblocks);
    if (result == NULL)
        goto done;
    size_t plen = (size_t)prev.len;  /* the chain input before block i's tokens ends at scratch + head */
    memcpy(scratch + head - plen, prev.buf, plen);
    for (Py_ssize_t i = 0; i < nblocks; i++) {
        if (items != NULL) {
            if (put_tokens(items + i * page_size, page_size, scratch + head) < 0)
                goto fail;
        } else {
            memcpy(scratch + head, raw + i * step, step);
        }
        XXH128_canonical_t digest;
        XXH128_canonicalFromHash(&digest, XXH3_128bits(scratch + head - plen, plen + step));
        PyObject *d = PyBytes_FromStringAndSize((const char *)digest.digest, HASH_BYTES);
        if (d == NULL)
            goto fail;
        PyList_SET_ITEM(result, i, d);
        memcpy(scratch + head - HASH_BYTES, digest.digest, HASH_BYTES);
        plen = HASH_BYTES;
    }
    /* the tail is not hashed, but its ids are checked as the numpy path checks them */
    if (items != NULL && put_tokens(items + nblocks * page_size, ntok - nblocks * page_size, scratch + head) < 0)
        goto fail;
    goto done;
fail:
    Py_CLEAR(result);
done:
    PyMem_Free(scratch);
    Py_XDECREF(seq);
    if (data.obj != NULL)
        PyBuffer_Release(&data);
    PyBuffer_Release(&prev);
    return result;
}

static PyMethodDef methods[] = {
    {"chain", chain, METH_VARARGS, "chain(tokens, page_size, prev) -> list of 16-byte chained XXH3-128 digests"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hashing", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hashing(void)
{
    return PyModule_Create(&module);
}
