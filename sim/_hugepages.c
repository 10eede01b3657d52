/* sim._hugepages: pymalloc arenas on transparent huge pages (compiled simulator only).
 *
 * A 1000-member simulation keeps ~650 MB of small objects (10^6 member
 * records across the cores) and touches them in random order, one cold core
 * after another: with 4 KiB pages nearly every such access also misses the
 * TLB. pymalloc takes its arenas (1 MiB) from mmap one by one, too small and
 * unaligned for the kernel to back them with 2 MiB pages. install() reserves
 * one large address range aligned to 2 MiB, asks for huge pages on it
 * (madvise MADV_HUGEPAGE, which the default THP mode "madvise" honours) and
 * hands pymalloc its arenas from it.
 *
 * Measured (bench/README-sim.md, "Speed on 2026-11-27, night"): 1000 x 600 s
 * settled, side by side with it off (PEERSIM_HUGEPAGES=0), together with the
 * glibc tunable sim/cli.py sets: 37.6 vs 42.5 s and 40.7 vs 43.7 s; same
 * trace hash. Linux only; elsewhere install() returns False.
 *
 * Only `peersim --compiled` calls it (sim/cli.py), once, before the cluster
 * is built. Objects never move; the reservation is address space only
 * (MAP_NORESERVE): memory is committed page by page as arenas are used.
 * Freed arenas go back to the kernel (MADV_DONTNEED) and are reused. When the
 * range is used up, or anything fails, arenas come from the previous
 * allocator as before, which also frees the arenas it handed out earlier.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define HAVE_THP 1
#else
#define HAVE_THP 0  /* elsewhere install() declines and the build still works */
#endif

#define HUGE_PAGE ((size_t)2 << 20)

static char *range_base = NULL, *range_top = NULL;
static size_t arena_size = 0;      /* the size pymalloc asks for (fixed per build) */
static unsigned long long arenas_in_range = 0, arenas_outside = 0, arenas_reused = 0;

#if HAVE_THP
static char *range_end = NULL;
static void **free_arenas = NULL;  /* stack of freed arenas of this range (kept outside them) */
static size_t n_free = 0, max_free = 0;
static PyObjectArenaAllocator previous;

static int in_range(void *p) {
    return range_base != NULL && (char *)p >= range_base && (char *)p < range_end;
}

static void *arena_alloc(void *ctx, size_t size) {
    (void)ctx;
    if (arena_size == 0)
        arena_size = size;  /* pymalloc asks for one fixed size (ARENA_SIZE) */
    if (size == arena_size) {
        if (n_free > 0) {
            arenas_reused++;
            return free_arenas[--n_free];
        }
        if ((size_t)(range_end - range_top) >= size) {
            void *p = range_top;
            range_top += size;
            arenas_in_range++;
            return p;
        }
    }
    arenas_outside++;
    return previous.alloc(previous.ctx, size);
}

static void arena_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    if (in_range(ptr)) {
        /* give the memory back; the addresses stay ours for the next arena */
        madvise(ptr, size, MADV_DONTNEED);
        if (n_free < max_free)
            free_arenas[n_free++] = ptr;
        return;
    }
    previous.free(previous.ctx, ptr, size);
}

static PyObject *install(PyObject *self, PyObject *args) {
    unsigned long long reserve = 16ULL << 30;
    (void)self;
    if (!PyArg_ParseTuple(args, "|K", &reserve))
        return NULL;
    if (range_base != NULL)
        Py_RETURN_FALSE;  /* already installed */
    if (reserve < HUGE_PAGE) {
        PyErr_SetString(PyExc_ValueError, "reserve must be at least 2 MiB");
        return NULL;
    }
    reserve &= ~(unsigned long long)(HUGE_PAGE - 1);
    char *p = mmap(NULL, reserve + HUGE_PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        Py_RETURN_FALSE;
    char *aligned = (char *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (madvise(aligned, reserve, MADV_HUGEPAGE) != 0) {
        munmap(p, reserve + HUGE_PAGE);
        Py_RETURN_FALSE;  /* no THP in this kernel: nothing to gain */
    }
    /* room for every arena the range can hold (4 KiB per GiB at 1 MiB arenas;
     * smaller arenas than 256 KiB only waste some of the range) */
    max_free = (size_t)(reserve / ((size_t)256 << 10));
    free_arenas = malloc(max_free * sizeof(void *));
    if (free_arenas == NULL) {
        munmap(p, reserve + HUGE_PAGE);
        Py_RETURN_FALSE;
    }
    PyObject_GetArenaAllocator(&previous);
    range_base = range_top = aligned;
    range_end = aligned + reserve;
    PyObjectArenaAllocator ours = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&ours);
    Py_RETURN_TRUE;
}
#else
static PyObject *install(PyObject *self, PyObject *args) {
    unsigned long long reserve = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "|K", &reserve))
        return NULL;
    Py_RETURN_FALSE;  /* no transparent huge pages on this platform */
}
#endif

static PyObject *stats(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:O,s:K,s:K,s:K,s:K,s:K}",
                         "installed", range_base != NULL ? Py_True : Py_False,
                         "arena_bytes", (unsigned long long)arena_size,
                         "arenas_in_range", arenas_in_range,
                         "arenas_reused", arenas_reused,
                         "arenas_outside", arenas_outside,
                         "range_used_bytes", (unsigned long long)(range_top - range_base));
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install([reserve_bytes]) -> bool: take pymalloc arenas from a huge-page range (once)"},
    {"stats", stats, METH_NOARGS, "stats() -> dict: arenas placed in and outside the range"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sim._hugepages",
                                    "pymalloc arenas on transparent huge pages", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__hugepages(void) { return PyModule_Create(&module); }
