// cuda_emu.h -- the CUDA device-side language, emulated on the host CPU.
//
// gpuconv.emu compiles a kernels_cu/*.cu file with g++ and `-include cuda_emu.h`, appends one
// `emu_launch_<kernel>` entry point per kernel and calls it through ctypes. This header supplies
// the CUDA keywords, built-in variables, vector types, intrinsics and the scheduler that runs a
// thread block as cooperative fibers:
//
// * Every thread of a block is a fiber with its own stack. A fiber runs until it reaches
//   __syncthreads(), a warp intrinsic (__shfl_*_sync, __ballot_sync, __syncwarp...) or its end,
//   then hands control back to the scheduler. Blocks run one after another, in the launch's
//   block order (forward, reverse or a seeded random permutation of the grid).
// * The scheduler resumes the runnable fibers of a block once per round, in the order chosen by
//   the launch (forward, reverse or a seeded random permutation redrawn every round), so code
//   that forgets a barrier reads data its neighbours have not written yet in at least one order.
// * __syncthreads() releases the block when every thread has arrived; a block whose remaining
//   threads wait at a barrier that exited threads never reach is reported, as is a deadlock.
// * Warp intrinsics are computed when every lane named in the mask (and present in the block)
//   has arrived. A shuffle that reads a lane outside the participating set returns all-ones bits
//   (a NaN for float): the value is undefined on a GPU.
// * Shared memory is poisoned with 0xFF bytes (NaN as float) before every block: static
//   __shared__ variables live in the `emu_shared` section, dynamic shared memory in a fixed
//   arena that gpuconv.emu points `extern __shared__ T name[]` at (the only source rewrite).
// * Threads are cooperative, so atomics are plain read-modify-writes (real atomics under the race
//   detector, racecheck.h, which also turns every thread into a ThreadSanitizer fiber).
// * SIGSEGV/SIGBUS/SIGFPE raised by a kernel are caught on an alternate signal stack and turned
//   into an error report naming the block and thread; gpuconv.emu places every array argument
//   against guard pages, so an out-of-bounds access faults.
// * While a launch runs, the SSE control register flushes denormals to zero (as -ftz=true on the
//   GPU, for double precision as well). libm's expf/logf/... are more exact than the GPU's.
//
// One launch at a time per process: the built-in variables are plain globals (a thread_local in
// a dlopen'ed library costs a function call per access); gpuconv.emu holds a lock.
#pragma once

#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <type_traits>

// Fibers switch with a few lines of x86-64 assembly; elsewhere (or with GPUCONV_EMU_UCONTEXT
// defined, to test that path) with ucontext, whose swapcontext makes a system call per switch.
#if defined(__x86_64__) && !defined(GPUCONV_EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#define EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// ---------------------------------------------------------------------------------------------
// Keywords. Defined after the system headers, which use __noinline__ as an attribute name.
#define GPUCONV_EMU 1
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// `used` keeps the optimiser from assuming nothing outside the kernel touches the variable: the
// scheduler poisons it between blocks, and other fibers write it across __syncthreads().
#define __shared__ static __attribute__((section("emu_shared"), used))

enum { warpSize = 32 };

// ---------------------------------------------------------------------------------------------
// Vector types.
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct __attribute__((aligned(8))) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct int3 { int x, y, z; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };

static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return {x, y}; }
static inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
static inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
static inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
static inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return {x, y, z}; }
static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
static inline double2 make_double2(double x, double y) { return {x, y}; }

// Built-in variables: plain globals, set by the scheduler before it resumes a fiber.
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

// ---------------------------------------------------------------------------------------------
// Math. CUDA's fast intrinsics map to libm, which is more exact than the GPU's approximations.
// glibc's math.h declares __expf, __logf... as internal functions it does not export, so these
// names can only be macros here.
#define __expf(x) expf(x)
#define __exp10f(x) exp10f(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __powf(x, y) powf(x, y)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float fdividef(float x, float y) { return x / y; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fadd_rn(float x, float y) { return x + y; }
static inline float __fsub_rn(float x, float y) { return x - y; }
static inline float __fmul_rn(float x, float y) { return x * y; }
static inline float __fdiv_rn(float x, float y) { return x / y; }
static inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
static inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline int __float_as_int(float x) { int r; memcpy(&r, &x, 4); return r; }
static inline float __int_as_float(int x) { float r; memcpy(&r, &x, 4); return r; }
static inline unsigned int __float_as_uint(float x) { unsigned int r; memcpy(&r, &x, 4); return r; }
static inline float __uint_as_float(unsigned int x) { float r; memcpy(&r, &x, 4); return r; }
static inline long long __double_as_longlong(double x) { long long r; memcpy(&r, &x, 8); return r; }
static inline double __longlong_as_double(long long x) { double r; memcpy(&r, &x, 8); return r; }
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(unsigned int x) { return x ? __builtin_clz(x) : 32; }
static inline int __ffs(unsigned int x) { return __builtin_ffs((int)x); }
static inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
static inline int __mul24(int x, int y) { return x * y; }
static inline unsigned int __umulhi(unsigned int x, unsigned int y) {
    return (unsigned int)(((unsigned long long)x * y) >> 32);
}

// CUDA's min/max accept any pair of arithmetic types with the usual conversions; floating
// arguments behave as fminf/fmaxf (a NaN operand yields the other operand).
template <class A, class B>
static inline auto min(A a, B b) -> decltype(a + b) {
    using R = decltype(a + b);
    if constexpr (std::is_floating_point<R>::value) return std::fmin(R(a), R(b));
    else return R(a) < R(b) ? R(a) : R(b);
}
template <class A, class B>
static inline auto max(A a, B b) -> decltype(a + b) {
    using R = decltype(a + b);
    if constexpr (std::is_floating_point<R>::value) return std::fmax(R(a), R(b));
    else return R(a) < R(b) ? R(b) : R(a);
}

template <class T>
static inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------------------------
// Atomics: fibers never interleave inside a call, so a plain read-modify-write is atomic. Under
// the race detector they are real relaxed atomics (CUDA's are relaxed too), so that TSan knows
// them for what they are and they order nothing.
namespace emu {
// The race detector's model of __threadfence() (racecheck.h), defined with the scheduler below.
static inline void race_fence();
static inline void race_atomic(void* p);
}  // namespace emu

template <class T, class Update>
static inline T emu_atomic_update(T* p, Update update) {
#if defined(GPUCONV_EMU_RACECHECK)
    emu::race_atomic(p);
    T old, desired;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do desired = update(old);
    while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
#else
    T old = *p;
    *p = update(old);
    return old;
#endif
}
#define EMU_ATOMIC(name, T, expr) \
    static inline T name(T* p, T v) { return emu_atomic_update(p, [v](T old) { return (T)(expr); }); }
EMU_ATOMIC(atomicAdd, int, old + v)
EMU_ATOMIC(atomicAdd, unsigned int, old + v)
EMU_ATOMIC(atomicAdd, unsigned long long, old + v)
EMU_ATOMIC(atomicAdd, float, old + v)
EMU_ATOMIC(atomicAdd, double, old + v)
EMU_ATOMIC(atomicSub, int, old - v)
EMU_ATOMIC(atomicSub, unsigned int, old - v)
EMU_ATOMIC(atomicMax, int, old < v ? v : old)
EMU_ATOMIC(atomicMax, unsigned int, old < v ? v : old)
EMU_ATOMIC(atomicMax, unsigned long long, old < v ? v : old)
EMU_ATOMIC(atomicMin, int, v < old ? v : old)
EMU_ATOMIC(atomicMin, unsigned int, v < old ? v : old)
EMU_ATOMIC(atomicMin, unsigned long long, v < old ? v : old)
EMU_ATOMIC(atomicExch, int, v)
EMU_ATOMIC(atomicExch, unsigned int, v)
EMU_ATOMIC(atomicExch, unsigned long long, v)
EMU_ATOMIC(atomicExch, float, v)
EMU_ATOMIC(atomicAnd, int, old & v)
EMU_ATOMIC(atomicAnd, unsigned int, old & v)
EMU_ATOMIC(atomicOr, int, old | v)
EMU_ATOMIC(atomicOr, unsigned int, old | v)
EMU_ATOMIC(atomicXor, int, old ^ v)
EMU_ATOMIC(atomicXor, unsigned int, old ^ v)
#undef EMU_ATOMIC

template <class T>
static inline T atomicCAS(T* p, T compare, T v) {
    static_assert(std::is_integral<T>::value, "atomicCAS takes int, unsigned int or unsigned long long");
    return emu_atomic_update(p, [compare, v](T old) { return old == compare ? v : old; });
}

static inline void __threadfence() {
    __asm__ __volatile__("" ::: "memory");
    emu::race_fence();
}
static inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }

// ---------------------------------------------------------------------------------------------
// Hook for kernels_cu/ptx.cuh (the emulated cp.async, mma.sync and ldmatrix). ptx.cuh keeps
// per-thread state, the copies a thread has in flight above all, and sets this pointer; the
// scheduler calls it as each thread of a block starts (with the thread's linear index), so that
// nothing carries over from an earlier block or launch. Null when a file does not include ptx.cuh.
namespace emu {
static void (*reset_thread_state)(int thread) = nullptr;
}  // namespace emu

// ---------------------------------------------------------------------------------------------
// The race detector's hooks (empty unless GPUCONV_EMU_RACECHECK) and EMU_RUNTIME, which keeps
// TSan's instrumentation out of the scheduler below.
#include "racecheck.h"

// ---------------------------------------------------------------------------------------------
// Fibers and the block scheduler.
namespace emu {

enum State { RUNNABLE, AT_BARRIER, AT_WARP, DONE, FAILED };
enum WarpOp { SHFL, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL, SYNCWARP };
enum Order { FORWARD = 0, REVERSE = 1, RANDOM = 2 };
// Result codes of a launch, mirrored by gpuconv.emu.
enum Code {
    OK = 0, SIGNAL = 1, DIVERGENCE = 2, DEADLOCK = 3, WARP_MISUSE = 4, SHARED_OVERRUN = 5, STACK_OVERFLOW = 6, NO_MEMORY = 7
};

static const char* const kWarpOpNames[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                            "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};

struct Fiber {
    void* sp;  // saved stack pointer while suspended
    uint3 tid;
    int state;
    // The pending warp intrinsic or barrier reduction (__syncthreads_count...) and its result.
    int op;
    unsigned int mask;
    int arg;
    int width;
    unsigned long long value, result;
#if !EMU_ASM_SWITCH
    ucontext_t ctx;
#endif
};

// What a launch reports back to Python (layout mirrored by gpuconv.emu._Report).
struct Report {
    int code;
    int signal;
    int signal_code;  // siginfo's si_code: FPE_INTDIV...
    unsigned long long fault_address;
    unsigned int block[3];
    unsigned int thread[3];
    char message[512];
    // Where shared memory lay in this launch, [begin, end): the race detector names it.
    unsigned long long dynamic_shared[2];
    unsigned long long static_shared[2];
};

// 64 KiB per thread: far more than a kernel's registers and local arrays need on a GPU.
static const size_t kStackBytes = 64 * 1024;
static const size_t kMaxDynamicShared = 227 * 1024;  // Hopper's opt-in maximum per block
// Bytes past the requested dynamic shared size that stay poisoned: a write there is an overrun.
static const size_t kSharedRedzone = 1024;

static Fiber* fibers;
static int fiber_count;
static Fiber* current;
static void* scheduler_sp;
static void (*body)(void**);
static void** body_args;
static char* stack_pool;
static size_t stack_pool_bytes;
static size_t page_bytes;
static Report* report;
static sigjmp_buf fault_jump;
static int scheduler_order;
static unsigned long long rng_state;
static int block_order;
static unsigned long long block_seed;

static inline void race_fence() { race::fence((int)(current - fibers)); }
static inline void race_atomic(void* p) { race::atomic((int)(current - fibers), p); }

}  // namespace emu

// The dynamic shared memory arena; gpuconv.emu rewrites `extern __shared__ T name[];` into
// `T* const name = reinterpret_cast<T*>(emu_dynamic_shared);`.
// The race detector maps it afresh before every block: pages of its own (racecheck.ld).
#if defined(GPUCONV_EMU_RACECHECK)
#define EMU_ARENA_PLACEMENT __attribute__((aligned(4096), section("emu_arena"), used))
#else
#define EMU_ARENA_PLACEMENT __attribute__((aligned(64), used))
#endif
static char emu_dynamic_shared[emu::kMaxDynamicShared + emu::kSharedRedzone] EMU_ARENA_PLACEMENT;
// Bounds of the static __shared__ variables, provided by the linker (weak: a file may have none).
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace emu {

#if EMU_ASM_SWITCH
// Saves the callee-saved registers and the stack pointer of the running context in *from and
// resumes the context whose stack pointer is `to`. The SysV ABI makes every other register
// caller-saved, and the call itself is opaque, so the compiler reloads memory after it.
extern "C" void emu_switch_context(void** from, void* to) __attribute__((visibility("hidden")));
__asm__(
    ".text\n"
    ".globl emu_switch_context\n"
    ".hidden emu_switch_context\n"
    ".type emu_switch_context,@function\n"
    ".p2align 4\n"
    "emu_switch_context:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size emu_switch_context, .-emu_switch_context\n");
#else
static ucontext_t scheduler_ctx;
#endif

static void fiber_main();

EMU_RUNTIME static inline void resume(Fiber* f) {
    current = f;
    threadIdx = f->tid;
    race::enter((int)(f - fibers));
#if EMU_ASM_SWITCH
    emu_switch_context(&scheduler_sp, f->sp);
#else
    swapcontext(&scheduler_ctx, &f->ctx);
#endif
}

EMU_RUNTIME static inline void yield_to_scheduler() {
    race::leave();
#if EMU_ASM_SWITCH
    emu_switch_context(&current->sp, scheduler_sp);
#else
    swapcontext(&current->ctx, &scheduler_ctx);
#endif
}

EMU_RUNTIME static void fiber_main() {
    body(body_args);
    current->state = DONE;
    yield_to_scheduler();
    __builtin_unreachable();
}

static void fail_in_fiber(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
EMU_RUNTIME static void fail_in_fiber(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    race::ignore_begin();  // the report is the scheduler's, not kernel memory
    vsnprintf(report->message, sizeof report->message, fmt, ap);
    race::ignore_end();
    va_end(ap);
    report->code = code;
    current->state = FAILED;
    yield_to_scheduler();
    __builtin_unreachable();
}

// A fresh fiber starts in fiber_main on the top of its stack.
EMU_RUNTIME static void prepare_fiber(Fiber* f, int index) {
    char* top = stack_pool + (size_t)(index + 1) * (kStackBytes + page_bytes);
#if EMU_ASM_SWITCH
    // emu_switch_context pops six registers and returns: into fiber_main, which then sees the
    // stack pointer it would see after a call (8 mod 16), with a null return address above.
    void** sp = (void**)top;
    *--sp = nullptr;
    *--sp = (void*)&fiber_main;
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f->sp = sp;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = top - kStackBytes;
    f->ctx.uc_stack.ss_size = kStackBytes;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, fiber_main, 0);
#endif
    f->state = RUNNABLE;
    if (reset_thread_state) reset_thread_state(index);  // the ptx.cuh hook above
}

// Stacks live in one mapping, reused across blocks and launches, each above a PROT_NONE page.
EMU_RUNTIME static void protect_stack_guards(int count) {
    for (int i = 0; i < count; ++i) mprotect(stack_pool + (size_t)i * (kStackBytes + page_bytes), page_bytes, PROT_NONE);
}

EMU_RUNTIME static bool reserve_stacks(int count) {
    size_t slot = kStackBytes + page_bytes;
    if ((size_t)count * slot <= stack_pool_bytes) return true;
    if (stack_pool) munmap(stack_pool, stack_pool_bytes);
    delete[] fibers;
    size_t bytes = (size_t)count * slot;
    void* pool = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (pool == MAP_FAILED) {
        stack_pool = nullptr;
        stack_pool_bytes = 0;
        fibers = nullptr;
        return false;
    }
    stack_pool = (char*)pool;
    stack_pool_bytes = bytes;
    protect_stack_guards(count);
    fibers = new Fiber[count];
    return true;
}

EMU_RUNTIME static bool in_stack_guard(const char* address) {
    if (!stack_pool || address < stack_pool || address >= stack_pool + stack_pool_bytes) return false;
    return (size_t)(address - stack_pool) % (kStackBytes + page_bytes) < page_bytes;
}

// --- warp intrinsics (fiber side) ---

EMU_RUNTIME static inline int lane_of(const Fiber* f) { return (int)((f - fibers) % warpSize); }

template <class T>
EMU_RUNTIME static inline T warp_op(int op, unsigned int mask, T value, int arg, int width) {
    static_assert(sizeof(T) <= 8, "warp intrinsics take values of at most 8 bytes");
    if (width < 1 || width > warpSize || (width & (width - 1)))
        fail_in_fiber(WARP_MISUSE, "%s: width %d is not a power of two in [1, 32]", kWarpOpNames[op], width);
    Fiber* f = current;
    if (!(mask >> lane_of(f) & 1u))
        fail_in_fiber(WARP_MISUSE, "%s: mask 0x%08x does not include the calling lane %d", kWarpOpNames[op], mask,
                      lane_of(f));
    f->op = op;
    f->mask = mask;
    f->arg = arg;
    f->width = width;
    f->value = 0;
    memcpy(&f->value, &value, sizeof(T));
    f->state = AT_WARP;
    yield_to_scheduler();
    T result;
    memcpy(&result, &f->result, sizeof(T));
    return result;
}

// --- the scheduler ---

static void fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
EMU_RUNTIME static void fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    race::ignore_begin();
    vsnprintf(report->message, sizeof report->message, fmt, ap);
    race::ignore_end();
    va_end(ap);
    report->code = code;
}

EMU_RUNTIME static int linear_of(const uint3& t) { return (int)(t.x + blockDim.x * (t.y + blockDim.y * t.z)); }

EMU_RUNTIME static const char* state_name(int state) {
    switch (state) {
        case RUNNABLE: return "running";
        case AT_BARRIER: return "__syncthreads";
        case AT_WARP: return "a warp intrinsic";
        case DONE: return "exited";
        default: return "failed";
    }
}

// Resolves every warp intrinsic whose participants have all arrived. Returns false on misuse.
EMU_RUNTIME static bool resolve_warps(int* released) {
    for (int base = 0; base < fiber_count; base += warpSize) {
        Fiber* warp = fibers + base;
        int lanes = fiber_count - base < warpSize ? fiber_count - base : warpSize;
        unsigned int waiting = 0, exited = 0;
        for (int l = 0; l < lanes; ++l) {
            if (warp[l].state == AT_WARP) waiting |= 1u << l;
            if (warp[l].state == DONE) exited |= 1u << l;
        }
        unsigned int present = lanes == warpSize ? ~0u : (1u << lanes) - 1u;
        for (int l = 0; l < lanes; ++l) {
            Fiber& f = warp[l];
            if (f.state != AT_WARP) continue;
            // Lanes outside the block and lanes that have exited cannot take part; all others
            // named in the mask must have reached the intrinsic.
            unsigned int group = f.mask & present & ~exited;
            if ((group & waiting) != group) continue;
            for (int m = 0; m < lanes; ++m) {
                if (!(group >> m & 1u)) continue;
                if (warp[m].op != f.op || warp[m].mask != f.mask) {
                    threadIdx = warp[m].tid;
                    fail(WARP_MISUSE, "warp %d: lane %d is at %s (mask 0x%08x) while lane %d is at %s (mask 0x%08x)",
                         base / warpSize, l, kWarpOpNames[f.op], f.mask, m, kWarpOpNames[warp[m].op], warp[m].mask);
                    return false;
                }
            }
            unsigned int votes = 0;
            for (int m = 0; m < lanes; ++m)
                if (group >> m & 1u && warp[m].value) votes |= 1u << m;
            for (int m = 0; m < lanes; ++m) {
                if (!(group >> m & 1u)) continue;
                Fiber& g = warp[m];
                int width = g.width, start = m & ~(width - 1), source = m;
                switch (g.op) {
                    case SHFL: source = start + (g.arg & (width - 1)); break;
                    case SHFL_UP: source = m - g.arg >= start ? m - g.arg : m; break;
                    case SHFL_DOWN: source = m + g.arg < start + width ? m + g.arg : m; break;
                    case SHFL_XOR: source = (m ^ g.arg) < start + width ? m ^ g.arg : m; break;
                }
                switch (g.op) {
                    case SHFL: case SHFL_UP: case SHFL_DOWN: case SHFL_XOR:
                        // Reading a lane that does not take part is undefined: make it visible.
                        g.result = source >= 0 && source < warpSize && group >> source & 1u ? warp[source].value : ~0ull;
                        break;
                    case BALLOT: g.result = votes; break;
                    case ANY: g.result = votes != 0; break;
                    case ALL: g.result = votes == group; break;
                    default: g.result = 0; break;
                }
            }
            for (int m = 0; m < lanes; ++m)
                if (group >> m & 1u) warp[m].state = RUNNABLE;
            race::warp(base, base / warpSize, (fiber_count + warpSize - 1) / warpSize, group, present & ~exited);
            waiting &= ~group;
            *released += __builtin_popcount(group);
        }
    }
    return true;
}

EMU_RUNTIME static unsigned long long next_random() {
    // splitmix64: a fixed seed gives the same schedule on every machine.
    unsigned long long z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

EMU_RUNTIME static void describe_waiters(char* out, size_t size, int state) {
    size_t used = 0;
    int shown = 0, total = 0;
    for (int i = 0; i < fiber_count; ++i) {
        if (fibers[i].state != state) continue;
        ++total;
        if (shown < 8 && used < size) {
            const uint3& t = fibers[i].tid;
            used += snprintf(out + used, size - used, "%s(%u,%u,%u)", shown ? " " : "", t.x, t.y, t.z);
            ++shown;
        }
    }
    if (total > shown && used < size) snprintf(out + used, size - used, " and %d more", total - shown);
}

// Runs the block blockIdx to completion, its shared memory poisoned first (the static variables
// and `poisoned` bytes of the dynamic arena); false (with the report filled) on a detected error.
EMU_RUNTIME static bool run_block(int* order, size_t poisoned) {
    if (!race::block_begin(stack_pool, (size_t)fiber_count * (kStackBytes + page_bytes), emu_dynamic_shared,
                           kMaxDynamicShared + kSharedRedzone, __start_emu_shared, __stop_emu_shared, fiber_count)) {
        fail(NO_MEMORY, "cannot map the memory of a block afresh for the race detector");
        return false;
    }
    if (race::kEnabled) protect_stack_guards(fiber_count);
    race::ignore_begin();  // the poison is the scheduler's, not a kernel access
    if (__start_emu_shared) memset(__start_emu_shared, 0xff, (size_t)(__stop_emu_shared - __start_emu_shared));
    memset(emu_dynamic_shared, 0xff, poisoned);
    race::ignore_end();
    for (int i = 0; i < fiber_count; ++i) prepare_fiber(&fibers[i], i);
    for (;;) {
        if (scheduler_order == RANDOM)
            for (int i = fiber_count - 1; i > 0; --i) {
                int j = (int)(next_random() % (unsigned long long)(i + 1));
                int t = order[i]; order[i] = order[j]; order[j] = t;
            }
        for (int k = 0; k < fiber_count; ++k) {
            Fiber* f = &fibers[order[k]];
            if (f->state != RUNNABLE) continue;
            resume(f);
            if (f->state == FAILED) {
                threadIdx = f->tid;
                return false;
            }
        }
        int exited = 0, at_barrier = 0, released = 0;
        if (!resolve_warps(&released)) return false;
        if (released) continue;
        for (int i = 0; i < fiber_count; ++i) {
            exited += fibers[i].state == DONE;
            at_barrier += fibers[i].state == AT_BARRIER;
        }
        if (exited == fiber_count) return true;
        if (at_barrier == fiber_count) {
            // __syncthreads_count/and/or: the block-wide reduction of the predicates.
            unsigned long long count = 0;
            for (int i = 0; i < fiber_count; ++i) count += fibers[i].value != 0;
            for (int i = 0; i < fiber_count; ++i) {
                fibers[i].result = count;
                fibers[i].state = RUNNABLE;
            }
            race::barrier(fiber_count);
            continue;
        }
        char waiting[160], gone[160];
        if (at_barrier + exited == fiber_count) {
            describe_waiters(waiting, sizeof waiting, AT_BARRIER);
            describe_waiters(gone, sizeof gone, DONE);
            fail(DIVERGENCE,
                 "barrier divergence: %d thread(s) wait at __syncthreads() [%s] that %d exited thread(s) [%s] never reach",
                 at_barrier, waiting, exited, gone);
        } else {
            // Some lanes wait at a warp intrinsic for a lane that is at a barrier or has exited.
            describe_waiters(waiting, sizeof waiting, AT_WARP);
            fail(DEADLOCK, "deadlock: no thread can proceed; %d at __syncthreads(), %d at a warp intrinsic [%s], %d exited",
                 at_barrier, fiber_count - at_barrier - exited, waiting, exited);
        }
        threadIdx = fibers[0].tid;
        return false;
    }
}

// The index of the k-th block to run among n: k itself, n - 1 - k, or a bijection of [0, n)
// drawn from block_seed without storing the permutation (grids reach 2^63 blocks): a 4-round
// Feistel network on the next power of four at or above n, walking the cycle until the value
// falls inside [0, n) (fewer than four steps on average).
EMU_RUNTIME static unsigned long long block_at(unsigned long long k, unsigned long long n) {
    if (block_order == FORWARD || n < 2) return k;
    if (block_order == REVERSE) return n - 1 - k;
    int half = 1;
    while (half < 32 && (1ull << (2 * half)) < n) ++half;
    const unsigned long long mask = (1ull << half) - 1;
    do {
        unsigned long long left = k >> half, right = k & mask;
        for (unsigned long long round = 0; round < 4; ++round) {
            unsigned long long z = (right ^ (block_seed + round * 0x9e3779b97f4a7c15ull)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 29)) * 0x94d049bb133111ebull;
            unsigned long long mixed = left ^ ((z ^ (z >> 32)) & mask);
            left = right;
            right = mixed;
        }
        k = left << half | right;
    } while (k >= n);
    return k;
}

// Runs the blocks in the launch's block order, poisoning shared memory before each, up to the
// first error.
EMU_RUNTIME static void run_grid(int* order, size_t dynamic_shared) {
    const size_t poisoned = dynamic_shared + kSharedRedzone;
    const unsigned long long plane = (unsigned long long)gridDim.x * gridDim.y;
    const unsigned long long blocks = plane * gridDim.z;
    for (unsigned long long k = 0; k < blocks; ++k) {
        const unsigned long long b = block_at(k, blocks);
        blockIdx = make_uint3((unsigned)(b % gridDim.x), (unsigned)(b % plane / gridDim.x), (unsigned)(b / plane));
        const bool ran = run_block(order, poisoned);
        race::block_end(fiber_count);
        if (!ran) return;
        race::ignore_begin();  // the scheduler's look, not a kernel access
        size_t overrun = dynamic_shared;
        while (overrun < poisoned && (unsigned char)emu_dynamic_shared[overrun] == 0xff) ++overrun;
        race::ignore_end();
        if (overrun < poisoned) {
            fail(SHARED_OVERRUN, "a thread wrote dynamic shared memory at byte %zu, past the %zu bytes the launch gave",
                 overrun, dynamic_shared);
            return;
        }
    }
}

EMU_RUNTIME static void on_fault(int signal, siginfo_t* info, void*) {
    report->signal = signal;
    report->signal_code = info->si_code;
    report->fault_address = (unsigned long long)(uintptr_t)info->si_addr;
    siglongjmp(fault_jump, 1);
}

// cfg: grid x, y, z, block x, y, z, dynamic shared bytes, thread order, its seed, block order, its seed.
EMU_RUNTIME static int launch(const long long* cfg, void** args, void (*kernel_body)(void**), Report* out) {
    static char alt_stack[64 * 1024];
    memset(out, 0, sizeof *out);
    report = out;
    page_bytes = (size_t)sysconf(_SC_PAGESIZE);
    gridDim = dim3((unsigned)cfg[0], (unsigned)cfg[1], (unsigned)cfg[2]);
    blockDim = dim3((unsigned)cfg[3], (unsigned)cfg[4], (unsigned)cfg[5]);
    size_t dynamic_shared = (size_t)cfg[6];
    scheduler_order = (int)cfg[7];
    rng_state = (unsigned long long)cfg[8];
    block_order = (int)cfg[9];
    block_seed = (unsigned long long)cfg[10];
    fiber_count = (int)(blockDim.x * blockDim.y * blockDim.z);
    body = kernel_body;
    body_args = args;
    if (!reserve_stacks(fiber_count)) {
        fail(NO_MEMORY, "cannot map %d fiber stacks of %zu KiB", fiber_count, kStackBytes / 1024);
        return report->code;
    }
    if (!race::launch_begin(fiber_count)) {
        fail(NO_MEMORY, "cannot map the race detector's memory");
        return report->code;
    }
    for (int i = 0; i < fiber_count; ++i) {
        int x = i % (int)blockDim.x, rest = i / (int)blockDim.x;
        fibers[i].tid = make_uint3((unsigned)x, (unsigned)(rest % (int)blockDim.y), (unsigned)(rest / (int)blockDim.y));
    }
    int* order = new int[fiber_count];
    for (int i = 0; i < fiber_count; ++i) order[i] = scheduler_order == REVERSE ? fiber_count - 1 - i : i;

#if defined(GPUCONV_EMU_RACECHECK)
    // A fault under TSan ends the worker process; gpuconv.emu_racecheck then runs the launch
    // again without the race detector, whose handler names the array and the thread.
    run_grid(order, dynamic_shared);
    race::launch_end();
#else
    stack_t alt = {}, previous_alt;
    alt.ss_sp = alt_stack;
    alt.ss_size = sizeof alt_stack;
    sigaltstack(&alt, &previous_alt);
    struct sigaction action = {}, previous[3];
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    const int signals[3] = {SIGSEGV, SIGBUS, SIGFPE};
    for (int i = 0; i < 3; ++i) sigaction(signals[i], &action, &previous[i]);
#if defined(__x86_64__)
    const unsigned int saved_csr = _mm_getcsr();
    _mm_setcsr(saved_csr | 0x8040);  // flush-to-zero and denormals-are-zero, as -ftz=true
#endif

    if (sigsetjmp(fault_jump, 1) == 0) {
        run_grid(order, dynamic_shared);
    } else if (in_stack_guard((const char*)(uintptr_t)report->fault_address)) {
        report->code = STACK_OVERFLOW;
        threadIdx = current->tid;
        snprintf(report->message, sizeof report->message, "thread stack overflow (%zu KiB per thread)", kStackBytes / 1024);
    } else {
        report->code = SIGNAL;  // gpuconv.emu names the array argument the address belongs to
        threadIdx = current ? current->tid : make_uint3(0, 0, 0);
    }
#if defined(__x86_64__)
    _mm_setcsr(saved_csr);
#endif
    for (int i = 0; i < 3; ++i) sigaction(signals[i], &previous[i], nullptr);
    sigaltstack(&previous_alt, nullptr);
#endif
    delete[] order;
    report->dynamic_shared[0] = (unsigned long long)(uintptr_t)emu_dynamic_shared;
    report->dynamic_shared[1] = report->dynamic_shared[0] + dynamic_shared;
    report->static_shared[0] = (unsigned long long)(uintptr_t)__start_emu_shared;
    report->static_shared[1] = (unsigned long long)(uintptr_t)__stop_emu_shared;
    if (report->code) {
        report->block[0] = blockIdx.x; report->block[1] = blockIdx.y; report->block[2] = blockIdx.z;
        report->thread[0] = threadIdx.x; report->thread[1] = threadIdx.y; report->thread[2] = threadIdx.z;
    }
    current = nullptr;
    return report->code;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics (device side).
EMU_RUNTIME static inline int emu_block_barrier(int predicate) {
    emu::Fiber* f = emu::current;
    f->value = predicate != 0;
    f->state = emu::AT_BARRIER;
    emu::yield_to_scheduler();
    return (int)f->result;
}
static inline void __syncthreads() { emu_block_barrier(0); }
static inline int __syncthreads_count(int predicate) { return emu_block_barrier(predicate); }
static inline int __syncthreads_and(int predicate) {
    return emu_block_barrier(!predicate) == 0;
}
static inline int __syncthreads_or(int predicate) { return emu_block_barrier(predicate) != 0; }

static inline void __syncwarp(unsigned int mask = 0xffffffffu) { emu::warp_op(emu::SYNCWARP, mask, 0, 0, warpSize); }

template <class T>
static inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
    return emu::warp_op(emu::SHFL, mask, var, src_lane, width);
}
template <class T>
static inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    return emu::warp_op(emu::SHFL_UP, mask, var, (int)delta, width);
}
template <class T>
static inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    return emu::warp_op(emu::SHFL_DOWN, mask, var, (int)delta, width);
}
template <class T>
static inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {
    return emu::warp_op(emu::SHFL_XOR, mask, var, lane_mask, width);
}
static inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    return (unsigned int)emu::warp_op(emu::BALLOT, mask, (unsigned long long)(predicate != 0), 0, warpSize);
}
static inline int __any_sync(unsigned int mask, int predicate) {
    return (int)emu::warp_op(emu::ANY, mask, (unsigned long long)(predicate != 0), 0, warpSize);
}
static inline int __all_sync(unsigned int mask, int predicate) {
    return (int)emu::warp_op(emu::ALL, mask, (unsigned long long)(predicate != 0), 0, warpSize);
}
// The lanes of the warp that have not exited: the emulator keeps a warp converged between
// intrinsics, so there is no narrower active set to report.
EMU_RUNTIME static inline unsigned int __activemask() {
    int base = (int)(emu::current - emu::fibers) / warpSize * warpSize;
    unsigned int mask = 0;
    for (int l = 0; l < warpSize && base + l < emu::fiber_count; ++l)
        if (emu::fibers[base + l].state != emu::DONE) mask |= 1u << l;
    return mask;
}
