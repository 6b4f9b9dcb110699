/* Block identity and the shared hash index in C. The contracts are in kvbm_shm/hashing.py and
   kvbm_shm/hash_index.py; each function here computes exactly what their pure-Python paths do.

   chain(tokens, page_size, prev) -> list of 16-byte digests
       h_i = XXH3-128(h_(i-1) || tokens of block i as little-endian uint32), h_-1 = prev, each
       digest in XXH3's canonical (big-endian) form; only full blocks. `tokens` is a list or
       tuple of ints (converted here, OverflowError outside [0, 2**32), TypeError for an item that
       is not an int) or a C-contiguous buffer of little-endian uint32 (bytes, numpy).

   The index (layouts in hash_index.py): a header, then `slots` (a power of two) 32-byte slots
   [seq u64][hash 16 B][block u32][pad u32], linear probing from the slot named by the low bits
   of the hash's first 8 bytes (little-endian). One writer (the coordinator); each slot update is
   bracketed by seq += 1 (odd while writing); a removal shifts later entries back (no tombstones)
   and is bracketed by the header's epoch += 1, so a reader that found no entry while the epoch
   moved probes again.

   index_insert(index, slots, hashes, ids) / index_remove(index, slots, hashes, ids) -> count
   index_probe(index, slots, table, ids, record_bytes, gen_off, hash_off, state_off,
               registered, hashes, answer) -> list of block ids: the longest prefix of `hashes`
       whose index entry names a block whose record, read under the block table's seqlock, is
       in state `registered` with the same hash. With `answer` true: None instead when that
       prefix is not the lookup's answer (the index is closed; a slot or record kept changing;
       the prefix ended early and the header's lower_tiers is set).
   `index` and `table` are addresses of mappings the caller keeps alive; `ids` is a list with one
   item per block of the table, None until index_probe first returns that block and the block's
   int from then on (ids of a pool are few and returned again and again: no int is made twice). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "_vendor/xxhash/xxhash.h"

#define HASH_BYTES 16
#define EMPTY_BLOCK 0xFFFFFFFFu
#define SEQLOCK_TRIES 1000
#define PROBE_ATTEMPTS 8
#define SEQLOCK_SPINS 64  /* then each try yields: a writer preempted mid-update gets to finish */

static inline void seqlock_wait(int t)
{
    if (t >= SEQLOCK_SPINS)
        sched_yield();
}

/* ---------------------------------------------------------------- chained block hashes */

/* The value of an exact int in [0, 2**30) read straight from CPython's representation (every
   token id of a real vocabulary), without the generic conversion; 0 when the item is anything
   else (then the generic path decides). */
static inline int small_token(PyObject *item, uint32_t *v)
{
    if (!Py_IS_TYPE(item, &PyLong_Type))
        return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)item))
        return 0;
    Py_ssize_t value = PyUnstable_Long_CompactValue((PyLongObject *)item);
    if (value < 0)
        return 0;
    *v = (uint32_t)value;
    return 1;
#else
    Py_ssize_t size = Py_SIZE(item);  /* 0: zero; 1: one 30-bit digit; negative or more: generic */
    if ((size_t)size > 1)
        return 0;
    *v = size ? (uint32_t)((PyLongObject *)item)->ob_digit[0] : 0;
    return 1;
#endif
}

static int put_token_slow(PyObject *item, uint32_t *v)
{
    if (!PyLong_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "token ids must be ints");
        return -1;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow || x < 0 || x > 0xFFFFFFFFLL) {
        PyErr_Format(PyExc_OverflowError, "token id %R out of bounds for uint32", item);
        return -1;
    }
    *v = (uint32_t)x;
    return 0;
}

static int put_tokens(PyObject *const *items, Py_ssize_t n, unsigned char *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t t;
        if (!small_token(items[i], &t) && put_token_slow(items[i], &t) < 0)
            return -1;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(out + 4 * i, &t, 4);
#else
        out[4 * i] = (unsigned char)t;
        out[4 * i + 1] = (unsigned char)(t >> 8);
        out[4 * i + 2] = (unsigned char)(t >> 16);
        out[4 * i + 3] = (unsigned char)(t >> 24);
#endif
    }
    return 0;
}

static PyObject *chain(PyObject *self, PyObject *args)
{
    PyObject *tokens, *seq = NULL, *result = NULL;
    Py_ssize_t page_size;
    Py_buffer prev, data = {0};
    unsigned char *scratch = NULL, *converted = NULL;
    if (!PyArg_ParseTuple(args, "Ony*", &tokens, &page_size, &prev))
        return NULL;
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
        /* every id is converted (and checked, the tail too, as the numpy path checks them) first */
        converted = PyMem_Malloc(ntok ? (size_t)ntok * 4 : 1);
        if (converted == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        if (put_tokens(PySequence_Fast_ITEMS(seq), ntok, converted) < 0)
            goto done;
        raw = converted;
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
        memcpy(scratch + head, raw + i * step, step);
        XXH128_canonical_t digest;
        XXH128_canonicalFromHash(&digest, XXH3_128bits(scratch + head - plen, plen + step));
        PyObject *d = PyBytes_FromStringAndSize((const char *)digest.digest, HASH_BYTES);
        if (d == NULL)
            goto fail;
        PyList_SET_ITEM(result, i, d);
        memcpy(scratch + head - HASH_BYTES, digest.digest, HASH_BYTES);
        plen = HASH_BYTES;
    }
    goto done;
fail:
    Py_CLEAR(result);
done:
    PyMem_Free(scratch);
    PyMem_Free(converted);
    Py_XDECREF(seq);
    if (data.obj != NULL)
        PyBuffer_Release(&data);
    PyBuffer_Release(&prev);
    return result;
}

/* ---------------------------------------------------------------- the shared hash index */

#define INDEX_HEADER_BYTES 64

typedef struct {
    uint64_t seq;
    unsigned char hash[HASH_BYTES];
    uint32_t block;
    uint32_t pad;
} slot_t;

typedef struct {
    uint64_t epoch;
    uint64_t count;
    uint64_t slots;
    uint32_t lower_tiers;
    uint32_t closed;
} index_head_t;

typedef struct {
    Py_ssize_t gen_off, hash_off, state_off;
    int registered;
} record_fields_t;

static inline slot_t *slots_of(uintptr_t index)
{
    return (slot_t *)(index + INDEX_HEADER_BYTES);
}

static inline size_t home_of(const unsigned char *hash, size_t mask)
{
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--)
        v = (v << 8) | hash[b];
    return (size_t)(v & mask);
}

/* One writer: the slot's seq is made even (a crashed writer may have left it odd), then odd
   while the entry changes, then even again. */
static void slot_write(slot_t *s, const unsigned char *hash, uint32_t block)
{
    uint64_t q = (__atomic_load_n(&s->seq, __ATOMIC_RELAXED) + 1) & ~(uint64_t)1;
    __atomic_store_n(&s->seq, q + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(s->hash, hash, HASH_BYTES);
    __atomic_store_n(&s->block, block, __ATOMIC_RELAXED);
    __atomic_store_n(&s->seq, q + 2, __ATOMIC_RELEASE);
}

/* A consistent copy of a slot; 0 if it kept changing. */
static int slot_read(const slot_t *s, unsigned char *hash, uint32_t *block)
{
    for (int t = 0; t < SEQLOCK_TRIES; t++) {
        uint64_t a = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        seqlock_wait(t);
        if (a & 1)
            continue;
        memcpy(hash, s->hash, HASH_BYTES);
        *block = __atomic_load_n(&s->block, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->seq, __ATOMIC_RELAXED) == a)
            return 1;
    }
    return 0;
}

static int parse_hashes(PyObject *list, PyObject **seq)
{
    *seq = PySequence_Fast(list, "hashes must be a list of 16-byte bytes");
    if (*seq == NULL)
        return -1;
    PyObject *const *items = PySequence_Fast_ITEMS(*seq);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(*seq); i++) {
        if (!PyBytes_Check(items[i]) || PyBytes_GET_SIZE(items[i]) != HASH_BYTES) {
            PyErr_SetString(PyExc_ValueError, "hashes must be 16-byte bytes");
            Py_CLEAR(*seq);
            return -1;
        }
    }
    return 0;
}

static int check_slots(Py_ssize_t slots)
{
    if (slots <= 0 || (slots & (slots - 1))) {
        PyErr_Format(PyExc_ValueError, "index slots must be a power of two, got %zd", slots);
        return -1;
    }
    return 0;
}

/* Entries (hash, block) to insert or remove, as parsed lists; -1 with an exception if malformed. */
static int parse_entries(PyObject *hashes, PyObject *ids, PyObject **hseq, PyObject **iseq)
{
    if (parse_hashes(hashes, hseq) < 0)
        return -1;
    *iseq = PySequence_Fast(ids, "block ids must be a list of ints");
    if (*iseq == NULL || PySequence_Fast_GET_SIZE(*iseq) != PySequence_Fast_GET_SIZE(*hseq)) {
        if (*iseq != NULL)
            PyErr_SetString(PyExc_ValueError, "one block id per hash");
        Py_CLEAR(*hseq);
        Py_CLEAR(*iseq);
        return -1;
    }
    return 0;
}

static long block_id_of(PyObject *item)
{
    long b = PyLong_AsLong(item);
    if (b == -1 && PyErr_Occurred())
        return -1;
    if (b < 0 || b >= (long)EMPTY_BLOCK) {
        PyErr_Format(PyExc_ValueError, "block id %ld out of range", b);
        return -1;
    }
    return b;
}

static PyObject *index_insert(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    Py_ssize_t slots;
    PyObject *hashes, *ids, *hseq, *iseq;
    if (!PyArg_ParseTuple(args, "KnOO", &addr, &slots, &hashes, &ids) || check_slots(slots) < 0
            || parse_entries(hashes, ids, &hseq, &iseq) < 0)
        return NULL;
    index_head_t *head = (index_head_t *)(uintptr_t)addr;
    slot_t *table = slots_of((uintptr_t)addr);
    size_t mask = (size_t)slots - 1;
    Py_ssize_t added = 0;
    for (Py_ssize_t e = 0; e < PySequence_Fast_GET_SIZE(hseq); e++) {
        const unsigned char *hash = (const unsigned char *)PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(hseq, e));
        long b = block_id_of(PySequence_Fast_GET_ITEM(iseq, e));
        if (b < 0)
            goto fail;
        size_t i = home_of(hash, mask);
        Py_ssize_t n = 0;
        for (; n < slots; n++, i = (i + 1) & mask) {
            if (table[i].block == EMPTY_BLOCK) {
                slot_write(&table[i], hash, (uint32_t)b);
                added++;
                break;
            }
            if (memcmp(table[i].hash, hash, HASH_BYTES) == 0) {
                if (table[i].block != (uint32_t)b)
                    slot_write(&table[i], hash, (uint32_t)b);
                break;
            }
        }
        if (n == slots) {
            PyErr_SetString(PyExc_OverflowError, "hash index is full");
            goto fail;
        }
    }
    __atomic_store_n(&head->count, head->count + added, __ATOMIC_RELAXED);
    Py_DECREF(hseq);
    Py_DECREF(iseq);
    return PyLong_FromSsize_t(added);
fail:
    __atomic_store_n(&head->count, head->count + added, __ATOMIC_RELAXED);
    Py_DECREF(hseq);
    Py_DECREF(iseq);
    return NULL;
}

static const unsigned char zero_hash[HASH_BYTES];

static PyObject *index_remove(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    Py_ssize_t slots;
    PyObject *hashes, *ids, *hseq, *iseq;
    if (!PyArg_ParseTuple(args, "KnOO", &addr, &slots, &hashes, &ids) || check_slots(slots) < 0
            || parse_entries(hashes, ids, &hseq, &iseq) < 0)
        return NULL;
    index_head_t *head = (index_head_t *)(uintptr_t)addr;
    slot_t *table = slots_of((uintptr_t)addr);
    size_t mask = (size_t)slots - 1;
    Py_ssize_t removed = 0;
    PyObject *out = NULL;
    for (Py_ssize_t e = 0; e < PySequence_Fast_GET_SIZE(hseq); e++) {
        const unsigned char *hash = (const unsigned char *)PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(hseq, e));
        long b = block_id_of(PySequence_Fast_GET_ITEM(iseq, e));
        if (b < 0)
            goto done;
        size_t i = home_of(hash, mask);
        Py_ssize_t n = 0;
        for (; n < slots && table[i].block != EMPTY_BLOCK; n++, i = (i + 1) & mask)
            if (memcmp(table[i].hash, hash, HASH_BYTES) == 0)
                break;
        if (n == slots || table[i].block != (uint32_t)b)
            continue;  /* not indexed, or indexed under another block */
        uint64_t epoch = (__atomic_load_n(&head->epoch, __ATOMIC_RELAXED) + 1) & ~(uint64_t)1;
        __atomic_store_n(&head->epoch, epoch + 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        size_t j = i;
        for (;;) {  /* backward shift: move later entries of the run into the hole */
            j = (j + 1) & mask;
            if (table[j].block == EMPTY_BLOCK)
                break;
            size_t k = home_of(table[j].hash, mask);
            if (j > i ? (k <= i || k > j) : (k <= i && k > j)) {
                slot_write(&table[i], table[j].hash, table[j].block);
                i = j;
            }
        }
        slot_write(&table[i], zero_hash, EMPTY_BLOCK);
        __atomic_store_n(&head->epoch, epoch + 2, __ATOMIC_RELEASE);
        removed++;
    }
    out = PyLong_FromSsize_t(removed);
done:
    __atomic_store_n(&head->count, head->count - removed, __ATOMIC_RELAXED);
    Py_DECREF(hseq);
    Py_DECREF(iseq);
    return out;
}

#define NOT_FOUND (-1L)
#define STALLED (-2L)  /* a slot or record kept changing: the answer is not known */

/* The block the index names for `hash`, NOT_FOUND, or STALLED. A run that ended while a removal
   was shifting entries is probed again (a few times; then it counts as STALLED). `i` is the
   hash's home slot. */
static long probe_one(uintptr_t index, size_t mask, size_t i, const unsigned char *hash)
{
    const index_head_t *head = (const index_head_t *)index;
    const slot_t *table = slots_of(index);
    size_t home = i;
    for (int attempt = 0; attempt < PROBE_ATTEMPTS; attempt++) {
        uint64_t e0 = __atomic_load_n(&head->epoch, __ATOMIC_ACQUIRE);
        i = home;
        for (size_t n = 0; n <= mask; n++, i = (i + 1) & mask) {
            unsigned char h[HASH_BYTES];
            uint32_t b;
            if (!slot_read(&table[i], h, &b))
                return STALLED;
            if (b == EMPTY_BLOCK)
                break;
            if (memcmp(h, hash, HASH_BYTES) == 0)
                return (long)b;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (!(e0 & 1) && __atomic_load_n(&head->epoch, __ATOMIC_RELAXED) == e0)
            return NOT_FOUND;
    }
    return STALLED;
}

/* Whether block record `rec`, read under its seqlock, is in state `registered` under `hash`:
   1, 0, or -1 if it kept changing. */
static int record_names(const unsigned char *rec, const record_fields_t *f, const unsigned char *hash)
{
    const uint64_t *gen = (const uint64_t *)(rec + f->gen_off);
    for (int t = 0; t < SEQLOCK_TRIES; t++) {
        uint64_t a = __atomic_load_n(gen, __ATOMIC_ACQUIRE);
        seqlock_wait(t);
        if (a & 1)
            continue;
        unsigned char h[HASH_BYTES];
        memcpy(h, rec + f->hash_off, HASH_BYTES);
        unsigned char state = __atomic_load_n(rec + f->state_off, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(gen, __ATOMIC_RELAXED) == a)
            return state == f->registered && memcmp(h, hash, HASH_BYTES) == 0;
    }
    return -1;
}

static int arg_size(PyObject *arg, Py_ssize_t *out)
{
    *out = PyLong_AsSsize_t(arg);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* index_probe(index, slots, table, ids, record_bytes, gen_off, hash_off, state_off,
               registered, hashes, answer)
   Three passes over the request, so that the memory reads of each pass overlap: the home slots
   of every hash (prefetched), the index entries (up to the first miss; their records
   prefetched), the records. With `answer`, None when the coordinator must be asked: the index is
   closed, a slot or record kept changing, or the prefix ended early while a tier below G2 could
   hold the rest. */
static PyObject *index_probe(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "index_probe takes 11 arguments");
        return NULL;
    }
    uintptr_t addr = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    uintptr_t table_addr = (uintptr_t)PyLong_AsUnsignedLongLong(args[2]);
    Py_ssize_t slots, record_bytes, registered, gen_off, hash_off, state_off;
    PyObject *ids = args[3];
    if (!PyList_Check(ids)) {
        PyErr_SetString(PyExc_TypeError, "ids must be a list with one item per block");
        return NULL;
    }
    Py_ssize_t num_blocks = PyList_GET_SIZE(ids);
    if (PyErr_Occurred() || arg_size(args[1], &slots) < 0
            || arg_size(args[4], &record_bytes) < 0 || arg_size(args[5], &gen_off) < 0
            || arg_size(args[6], &hash_off) < 0 || arg_size(args[7], &state_off) < 0
            || arg_size(args[8], &registered) < 0 || check_slots(slots) < 0)
        return NULL;
    int answer = PyObject_IsTrue(args[10]);
    if (answer < 0)
        return NULL;
    if (gen_off < 0 || gen_off + 8 > record_bytes || hash_off < 0 || hash_off + HASH_BYTES > record_bytes
            || state_off < 0 || state_off >= record_bytes) {
        PyErr_SetString(PyExc_ValueError, "record fields outside the record");
        return NULL;
    }
    record_fields_t f = {gen_off, hash_off, state_off, (int)registered};
    const index_head_t *head = (const index_head_t *)addr;
    if (answer && __atomic_load_n(&head->closed, __ATOMIC_ACQUIRE))
        Py_RETURN_NONE;
    PyObject *hseq;
    if (parse_hashes(args[9], &hseq) < 0)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(hseq);
    PyObject *const *items = PySequence_Fast_ITEMS(hseq);
    long stack[512];
    long *found = n <= 512 ? stack : PyMem_Malloc(sizeof(long) * n);
    if (found == NULL) {
        Py_DECREF(hseq);
        return PyErr_NoMemory();
    }
    const slot_t *table = slots_of(addr);
    const unsigned char *records = (const unsigned char *)table_addr;
    size_t mask = (size_t)slots - 1;
    for (Py_ssize_t i = 0; i < n; i++) {  /* pass 1: home slots */
        found[i] = (long)home_of((const unsigned char *)PyBytes_AS_STRING(items[i]), mask);
        __builtin_prefetch(&table[found[i]]);
    }
    Py_ssize_t hits = 0;
    long stop = NOT_FOUND;
    for (; hits < n; hits++) {  /* pass 2: index entries */
        long b = probe_one(addr, mask, (size_t)found[hits], (const unsigned char *)PyBytes_AS_STRING(items[hits]));
        if (b < 0 || b >= num_blocks) {
            stop = b == STALLED ? STALLED : NOT_FOUND;
            break;
        }
        found[hits] = b;
        __builtin_prefetch(records + b * record_bytes);
    }
    for (Py_ssize_t i = 0; i < hits; i++) {  /* pass 3: the records vouch for the entries */
        const unsigned char *hash = (const unsigned char *)PyBytes_AS_STRING(items[i]);
        int named = record_names(records + found[i] * record_bytes, &f, hash);
        if (named != 1) {
            hits = i;
            stop = named < 0 ? STALLED : NOT_FOUND;
            break;
        }
    }
    Py_DECREF(hseq);
    PyObject *out;
    if (answer && hits < n && (stop == STALLED || __atomic_load_n(&head->lower_tiers, __ATOMIC_RELAXED))) {
        out = Py_None;
        Py_INCREF(out);
    } else {
        out = PyList_New(hits);
        for (Py_ssize_t i = 0; out != NULL && i < hits; i++) {
            PyObject *v = PyList_GET_ITEM(ids, found[i]);
            if (v == Py_None) {  /* first time this block is returned */
                v = PyLong_FromLong(found[i]);
                if (v == NULL) {
                    Py_CLEAR(out);
                    break;
                }
                PyList_SetItem(ids, found[i], v);  /* the list keeps this reference */
            }
            Py_INCREF(v);
            PyList_SET_ITEM(out, i, v);
        }
    }
    if (found != stack)
        PyMem_Free(found);
    return out;
}

static PyMethodDef methods[] = {
    {"chain", chain, METH_VARARGS, "chain(tokens, page_size, prev) -> list of 16-byte chained XXH3-128 digests"},
    {"index_insert", index_insert, METH_VARARGS, "index_insert(index, slots, hashes, ids) -> entries added"},
    {"index_remove", index_remove, METH_VARARGS, "index_remove(index, slots, hashes, ids) -> entries removed"},
    {"index_probe", (PyCFunction)(void (*)(void))index_probe, METH_FASTCALL,
     "index_probe(index, slots, table, ids, record_bytes, gen_off, hash_off, state_off, registered, hashes,"
     " answer) -> block ids of the longest verified prefix (with answer: or None, ask the coordinator)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hashing", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hashing(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "INDEX_HEADER_BYTES", INDEX_HEADER_BYTES) < 0
                      || PyModule_AddIntConstant(m, "SLOT_BYTES", sizeof(slot_t)) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
