/* A stand-in CUDA runtime for the stream-ordering tests (no GPU needed).
 *
 * Implements the entry points kt_kernel resolves (cudaLaunchHostFunc,
 * cudaMemcpy2DAsync, cudaStreamSynchronize, cudaHostAlloc, cudaFreeHost,
 * cudaGetErrorString) with one worker thread per stream handle that runs
 * copies and host functions strictly in order, as a GPU stream does. "Device"
 * memory is host memory. Every call and every executed operation is logged
 * with a global sequence number, so tests can check orderings.
 *
 * Test controls (fake_*): hold a stream (queue without running), capture a
 * stream into a graph and replay it (operations recorded during capture run
 * only on replay; allocation or a host sync while capturing is an error and
 * counted as a violation, as with real CUDA graphs).
 *
 * Built by the tests: cc -shared -fPIC -O1 -pthread fake_cudart.c
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { OP_MEMCPY = 1, OP_HOSTFN = 2 };
/* Log event kinds. */
enum {
  EV_CALL_MEMCPY = 1, /* cudaMemcpy2DAsync called (a = dst, b = src) */
  EV_CALL_HOSTFN = 2, /* cudaLaunchHostFunc called (a = fn, b = user data) */
  EV_RUN_MEMCPY = 3,  /* a copy executed on the stream (a = dst, b = src) */
  EV_HOSTFN_BEGIN = 4,
  EV_HOSTFN_END = 5,
  EV_ALLOC = 6,     /* cudaHostAlloc (a = ptr, b = bytes) */
  EV_SYNC = 7,      /* cudaStreamSynchronize */
  EV_VIOLATION = 8, /* a call that is illegal while capturing (a = kind: 1 alloc, 2 sync, 3 free) */
  EV_FREE = 9
};

typedef struct Event {
  int64_t seq;
  int32_t kind;
  int32_t pad;
  uint64_t stream, a, b;
} Event;

typedef struct Op {
  int kind;
  void* dst;
  const void* src;
  size_t dpitch, spitch, width, height;
  void (*fn)(void*);
  void* ud;
  struct Op* next;
} Op;

typedef struct Stream {
  uint64_t handle;
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  Op *head, *tail;
  int busy, held, capturing;
  Op** graph;
  size_t graph_n, graph_cap;
  struct Stream* next;
} Stream;

#define MAX_EVENTS 100000
static Event g_log[MAX_EVENTS];
static int64_t g_seq;
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_streams_mu = PTHREAD_MUTEX_INITIALIZER;
static Stream* g_streams;
static int g_capturing_any;
static int64_t g_allocs, g_violations;

static void log_ev(int kind, uint64_t stream, uint64_t a, uint64_t b) {
  pthread_mutex_lock(&g_log_mu);
  if (g_seq < MAX_EVENTS) {
    Event* e = &g_log[g_seq];
    e->seq = g_seq;
    e->kind = kind;
    e->stream = stream;
    e->a = a;
    e->b = b;
  }
  g_seq++;
  if (kind == EV_VIOLATION) g_violations++;
  pthread_mutex_unlock(&g_log_mu);
}

static void run_op(Stream* s, Op* op) {
  if (op->kind == OP_MEMCPY) {
    for (size_t r = 0; r < op->height; ++r)
      memcpy((char*)op->dst + r * op->dpitch, (const char*)op->src + r * op->spitch, op->width);
    log_ev(EV_RUN_MEMCPY, s->handle, (uint64_t)(uintptr_t)op->dst, (uint64_t)(uintptr_t)op->src);
  } else {
    log_ev(EV_HOSTFN_BEGIN, s->handle, (uint64_t)(uintptr_t)op->fn, (uint64_t)(uintptr_t)op->ud);
    op->fn(op->ud);
    log_ev(EV_HOSTFN_END, s->handle, (uint64_t)(uintptr_t)op->fn, (uint64_t)(uintptr_t)op->ud);
  }
}

static void* worker(void* arg) {
  Stream* s = (Stream*)arg;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    while (!s->head || s->held) pthread_cond_wait(&s->cv, &s->mu);
    Op* op = s->head;
    s->head = op->next;
    if (!s->head) s->tail = NULL;
    s->busy = 1;
    pthread_mutex_unlock(&s->mu);
    run_op(s, op);
    free(op);
    pthread_mutex_lock(&s->mu);
    s->busy = 0;
    pthread_cond_broadcast(&s->cv);
  }
  return NULL;
}

static Stream* get_stream(void* handle) {
  uint64_t h = (uint64_t)(uintptr_t)handle;
  pthread_mutex_lock(&g_streams_mu);
  Stream* s = g_streams;
  while (s && s->handle != h) s = s->next;
  if (!s) {
    s = (Stream*)calloc(1, sizeof(Stream));
    s->handle = h;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->next = g_streams;
    g_streams = s;
    pthread_create(&s->thread, NULL, worker, s);
    pthread_detach(s->thread);
  }
  pthread_mutex_unlock(&g_streams_mu);
  return s;
}

static void enqueue(Stream* s, Op* op) {
  pthread_mutex_lock(&s->mu);
  if (s->capturing) {
    if (s->graph_n == s->graph_cap) {
      s->graph_cap = s->graph_cap ? 2 * s->graph_cap : 16;
      s->graph = (Op**)realloc(s->graph, s->graph_cap * sizeof(Op*));
    }
    s->graph[s->graph_n++] = op;
  } else {
    op->next = NULL;
    if (s->tail)
      s->tail->next = op;
    else
      s->head = op;
    s->tail = op;
    pthread_cond_broadcast(&s->cv);
  }
  pthread_mutex_unlock(&s->mu);
}

/* ------------------------------------------------------------ CUDA runtime API */
int cudaLaunchHostFunc(void* stream, void (*fn)(void*), void* ud) {
  Stream* s = get_stream(stream);
  log_ev(EV_CALL_HOSTFN, s->handle, (uint64_t)(uintptr_t)fn, (uint64_t)(uintptr_t)ud);
  Op* op = (Op*)calloc(1, sizeof(Op));
  op->kind = OP_HOSTFN;
  op->fn = fn;
  op->ud = ud;
  enqueue(s, op);
  return 0;
}

int cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height, int kind,
                      void* stream) {
  (void)kind;
  if (width > dpitch || width > spitch) return 1; /* cudaErrorInvalidValue */
  Stream* s = get_stream(stream);
  log_ev(EV_CALL_MEMCPY, s->handle, (uint64_t)(uintptr_t)dst, (uint64_t)(uintptr_t)src);
  Op* op = (Op*)calloc(1, sizeof(Op));
  op->kind = OP_MEMCPY;
  op->dst = dst;
  op->src = src;
  op->dpitch = dpitch;
  op->spitch = spitch;
  op->width = width;
  op->height = height;
  enqueue(s, op);
  return 0;
}

int cudaStreamSynchronize(void* stream) {
  Stream* s = get_stream(stream);
  if (s->capturing) {
    log_ev(EV_VIOLATION, s->handle, 2, 0);
    return 900; /* cudaErrorStreamCaptureUnsupported */
  }
  log_ev(EV_SYNC, s->handle, 0, 0);
  pthread_mutex_lock(&s->mu);
  while (s->head || s->busy) {
    if (s->held) break; /* a held stream would never drain */
    pthread_cond_wait(&s->cv, &s->mu);
  }
  pthread_mutex_unlock(&s->mu);
  return 0;
}

int cudaHostAlloc(void** ptr, size_t bytes, unsigned flags) {
  (void)flags;
  if (g_capturing_any) {
    log_ev(EV_VIOLATION, 0, 1, bytes);
    return 900;
  }
  *ptr = aligned_alloc(64, (bytes + 63) / 64 * 64);
  log_ev(EV_ALLOC, 0, (uint64_t)(uintptr_t)*ptr, bytes);
  __atomic_add_fetch(&g_allocs, 1, __ATOMIC_SEQ_CST);
  return *ptr ? 0 : 2; /* cudaErrorMemoryAllocation */
}

int cudaFreeHost(void* ptr) {
  if (g_capturing_any) {
    log_ev(EV_VIOLATION, 0, 3, 0);
    return 900;
  }
  log_ev(EV_FREE, 0, (uint64_t)(uintptr_t)ptr, 0);
  free(ptr);
  return 0;
}

const char* cudaGetErrorString(int err) {
  switch (err) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case 2: return "out of memory";
    case 900: return "operation not permitted when stream is capturing";
  }
  return "unknown error";
}

/* ------------------------------------------------------------ test controls */
void fake_hold(uint64_t stream, int on) {
  Stream* s = get_stream((void*)(uintptr_t)stream);
  pthread_mutex_lock(&s->mu);
  s->held = on;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

/* Waits until the stream has run everything queued (it must not be held). */
void fake_wait_idle(uint64_t stream) {
  Stream* s = get_stream((void*)(uintptr_t)stream);
  pthread_mutex_lock(&s->mu);
  while (s->head || s->busy) pthread_cond_wait(&s->cv, &s->mu);
  pthread_mutex_unlock(&s->mu);
}

void fake_begin_capture(uint64_t stream) {
  Stream* s = get_stream((void*)(uintptr_t)stream);
  pthread_mutex_lock(&s->mu);
  for (size_t i = 0; i < s->graph_n; ++i) free(s->graph[i]);
  s->graph_n = 0;
  s->capturing = 1;
  g_capturing_any = 1;
  pthread_mutex_unlock(&s->mu);
}

/* Ends the capture; returns the number of operations in the graph. */
int64_t fake_end_capture(uint64_t stream) {
  Stream* s = get_stream((void*)(uintptr_t)stream);
  pthread_mutex_lock(&s->mu);
  s->capturing = 0;
  g_capturing_any = 0;
  int64_t n = (int64_t)s->graph_n;
  pthread_mutex_unlock(&s->mu);
  return n;
}

/* Kind of graph operation i (1 copy, 2 host function). */
int fake_graph_op(uint64_t stream, int64_t i) {
  Stream* s = get_stream((void*)(uintptr_t)stream);
  return (i >= 0 && (size_t)i < s->graph_n) ? s->graph[i]->kind : 0;
}

/* Queues the captured graph's operations on the stream again. */
void fake_replay(uint64_t stream) {
  Stream* s = get_stream((void*)(uintptr_t)stream);
  for (size_t i = 0; i < s->graph_n; ++i) {
    Op* op = (Op*)malloc(sizeof(Op));
    *op = *s->graph[i];
    op->next = NULL;
    enqueue(s, op);
  }
}

int64_t fake_log_size(void) {
  pthread_mutex_lock(&g_log_mu);
  int64_t n = g_seq < MAX_EVENTS ? g_seq : MAX_EVENTS;
  pthread_mutex_unlock(&g_log_mu);
  return n;
}

/* Copies events [first, first + n) into out; returns how many. */
int64_t fake_log_read(int64_t first, int64_t n, Event* out) {
  pthread_mutex_lock(&g_log_mu);
  int64_t have = g_seq < MAX_EVENTS ? g_seq : MAX_EVENTS;
  if (first + n > have) n = have - first;
  if (n > 0) memcpy(out, g_log + first, (size_t)n * sizeof(Event));
  pthread_mutex_unlock(&g_log_mu);
  return n < 0 ? 0 : n;
}

int64_t fake_allocs(void) { return __atomic_load_n(&g_allocs, __ATOMIC_SEQ_CST); }
int64_t fake_violations(void) { return g_violations; }
