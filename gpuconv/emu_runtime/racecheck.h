// racecheck.h -- the race detector of the emulated device: ThreadSanitizer told about the fibers.
//
// Included by cuda_emu.h. With GPUCONV_EMU_RACECHECK defined (gpuconv.emu_racecheck compiles the
// kernel with -fsanitize=thread and runs it in a process that loaded libtsan first) every thread
// of a block is a TSan fiber, and the only orderings TSan sees are the ones CUDA promises:
//
// * a fiber switch implies nothing (__tsan_switch_to_fiber_no_sync): two threads' accesses
//   between the same pair of barriers are unordered whatever order the scheduler ran them in;
// * __syncthreads() orders every thread of the block before it with every thread after it,
//   through one sync object per block; a warp intrinsic orders the lanes that take part, through
//   one per warp (a full warp) or one per lane (a partial mask). The scheduler performs these
//   releases and acquires itself, on each fiber's behalf, when the barrier or intrinsic completes;
// * the launch orders what the launching thread did before with every fiber (fibers are created
//   by it), and every fiber with what it does after (a release at the end of each block, one
//   acquire at the end of the launch). Nothing orders two blocks: each block has fibers of its
//   own and sync objects of its own, so a block that reads what another writes is a race;
// * atomics are real (relaxed, as CUDA's) atomics, visible to TSan and ordering nothing by
//   themselves; __threadfence() is modelled through the atomics around it in the same thread
//   (TSan knows no stand-alone fence): an atomic after a fence is a release on the atomic's
//   address, and a fence after an atomic is an acquire on the address of the last one, so
//   "store; fence; atomic" in one block and "atomic (reads that value); fence; load" in
//   another order the store before the load, as fence.acq_rel.gpu does, and without either
//   fence they stay unordered. __threadfence_block() orders nothing across blocks: not modelled.
//
// Memory reused from block to block would carry one block's accesses into the next: the fiber
// stacks, the dynamic shared memory arena, the static __shared__ variables (on pages of their
// own: racecheck.ld) and the sync objects are mapped afresh before every block (munmap + mmap,
// which makes TSan forget them), and the NaN poison is written with TSan's eyes closed. The scheduler's own code is not
// instrumented (EMU_RUNTIME): its bookkeeping is not kernel memory.
//
// Without GPUCONV_EMU_RACECHECK everything here compiles to nothing.
#pragma once

#if defined(GPUCONV_EMU_RACECHECK)

#include <deque>

#define EMU_RUNTIME __attribute__((no_sanitize_thread))

extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}

namespace emu {
namespace race {

static const bool kEnabled = true;
static const unsigned kNoSync = 1;  // __tsan_switch_to_fiber_no_sync

static void* launcher;       // the launching thread's TSan context
static void** fiber_of;      // the TSan fiber of each thread of the running block
static char* sync_objects;   // per block: [0] the block, [1 + w] warp w, [1 + warps + i] thread i
static size_t sync_bytes;
static char* launch_done;    // every block's fibers release here; the launcher acquires at the end
static bool* fenced;         // per thread of the running block: a __threadfence() since it began
static void** last_atomic;   // per thread: the address of its latest atomic, or null
// Fibers of finished blocks, destroyed at the end of the launch: a report about an access of a
// finished block names its thread and source line only while its fiber lives. Past this many
// the oldest go first, to stay well within TSan's limit on live threads.
static std::deque<void*> finished;
static const size_t kFinishedLimit = 1024;

// Maps [begin, begin + bytes) afresh (whole pages that hold nothing else): TSan forgets every
// access to it and every sync object in it.
EMU_RUNTIME static bool renew(char* begin, size_t bytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if ((uintptr_t)begin % page || bytes % page) return false;
    munmap(begin, bytes);
    void* again = mmap(begin, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return again == begin;
}

EMU_RUNTIME static inline void ignore_begin() { __tsan_ignore_thread_begin(); }
EMU_RUNTIME static inline void ignore_end() { __tsan_ignore_thread_end(); }

EMU_RUNTIME static inline void switch_to(void* fiber) { __tsan_switch_to_fiber(fiber, kNoSync); }
EMU_RUNTIME static inline void enter(int fiber) { switch_to(fiber_of[fiber]); }
EMU_RUNTIME static inline void leave() { switch_to(launcher); }

EMU_RUNTIME static char* block_object() { return sync_objects; }
EMU_RUNTIME static char* warp_object(int warp) { return sync_objects + 1 + warp; }
EMU_RUNTIME static char* thread_object(int warps, int fiber) { return sync_objects + 1 + warps + fiber; }

// Once per launch, before the first block, from the launching thread: fiber_count threads.
EMU_RUNTIME static bool launch_begin(int fiber_count) {
    launcher = __tsan_get_current_fiber();
    // Its own page, never renewed: no block's renewal may free this sync object.
    if (!launch_done) {
        void* page = mmap(nullptr, 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED) return false;
        launch_done = (char*)page;
    }
    delete[] fiber_of;
    fiber_of = new void*[fiber_count]();
    delete[] fenced;
    fenced = new bool[fiber_count];
    delete[] last_atomic;
    last_atomic = new void*[fiber_count];
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t needed = ((size_t)(1 + fiber_count + (fiber_count + 31) / 32) + page - 1) / page * page;
    if (needed > sync_bytes) {
        if (sync_objects) munmap(sync_objects, sync_bytes);
        void* fresh = mmap(nullptr, needed, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (fresh == MAP_FAILED) {
            sync_objects = nullptr;
            sync_bytes = 0;
            return false;
        }
        sync_objects = (char*)fresh;
        sync_bytes = needed;
    }
    return true;
}

// Before a block: fresh memory and fresh fibers, named after the threads they run (TSan's
// report names them; gpuconv.emu_racecheck reads the names back).
EMU_RUNTIME static bool block_begin(char* stacks, size_t stack_bytes, char* dynamic_shared, size_t dynamic_bytes,
                                    char* static_begin, char* static_end, int fiber_count) {
    // racecheck.ld gives the static __shared__ variables pages of their own.
    ignore_begin();
    const bool ok = renew(sync_objects, sync_bytes) && renew(stacks, stack_bytes) && renew(dynamic_shared, dynamic_bytes) &&
                    (static_begin == static_end || renew(static_begin, (size_t)(static_end - static_begin)));
    ignore_end();
    if (!ok) return false;
    for (int i = 0; i < fiber_count; ++i) {
        fenced[i] = false;
        last_atomic[i] = nullptr;
    }
    for (int i = 0; i < fiber_count; ++i) {
        char name[96];
        const unsigned x = (unsigned)i % blockDim.x, rest = (unsigned)i / blockDim.x;
        snprintf(name, sizeof name, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, x,
                 rest % blockDim.y, rest / blockDim.y);
        fiber_of[i] = __tsan_create_fiber(0);
        __tsan_set_fiber_name(fiber_of[i], name);
    }
    return true;
}

// After a block (finished or failed): its fibers' accesses happen before the launch's end.
EMU_RUNTIME static void block_end(int fiber_count) {
    for (int i = 0; i < fiber_count; ++i) {
        if (!fiber_of[i]) continue;
        enter(i);
        __tsan_release(launch_done);
        leave();
        finished.push_back(fiber_of[i]);
        fiber_of[i] = nullptr;
    }
    for (; finished.size() > kFinishedLimit; finished.pop_front()) __tsan_destroy_fiber(finished.front());
}

EMU_RUNTIME static void launch_end() {
    __tsan_acquire(launch_done);
    for (; !finished.empty(); finished.pop_front()) __tsan_destroy_fiber(finished.front());
}

// Every thread of the block has arrived at __syncthreads(): all before it, then all after.
EMU_RUNTIME static void barrier(int fiber_count) {
    for (int i = 0; i < fiber_count; ++i) { enter(i); __tsan_release(block_object()); }
    for (int i = 0; i < fiber_count; ++i) { enter(i); __tsan_acquire(block_object()); }
    leave();
}

// The lanes `group` of warp `warp` (fibers base..base+31) completed an intrinsic together. A
// full warp shares one object (what it accumulated from earlier groups came from these same
// lanes); a partial group goes lane to lane, so disjoint groups stay unordered.
EMU_RUNTIME static void warp(int base, int warp_index, int warps, unsigned int group, unsigned int present) {
    if (group == present) {
        for (int l = 0; l < 32; ++l) if (group >> l & 1u) { enter(base + l); __tsan_release(warp_object(warp_index)); }
        for (int l = 0; l < 32; ++l) if (group >> l & 1u) { enter(base + l); __tsan_acquire(warp_object(warp_index)); }
    } else {
        for (int l = 0; l < 32; ++l) if (group >> l & 1u) { enter(base + l); __tsan_release(thread_object(warps, base + l)); }
        for (int l = 0; l < 32; ++l) {
            if (!(group >> l & 1u)) continue;
            enter(base + l);
            for (int m = 0; m < 32; ++m) if (group >> m & 1u) __tsan_acquire(thread_object(warps, base + m));
        }
    }
    leave();
}

// Thread `fiber` (the running one) calls __threadfence(): an acquire through its last atomic.
EMU_RUNTIME static void fence(int fiber) {
    if (last_atomic[fiber]) __tsan_acquire(last_atomic[fiber]);
    fenced[fiber] = true;
}

// Thread `fiber` is about to make an atomic access to p: after a fence, a release through it.
EMU_RUNTIME static void atomic(int fiber, void* p) {
    if (fenced[fiber]) __tsan_release(p);
    last_atomic[fiber] = p;
}

}  // namespace race
}  // namespace emu

#else  // !GPUCONV_EMU_RACECHECK

#define EMU_RUNTIME

namespace emu {
namespace race {
static inline void ignore_begin() {}
static inline void ignore_end() {}
static inline void enter(int) {}
static inline void leave() {}
static inline bool launch_begin(int) { return true; }
static const bool kEnabled = false;
static inline bool block_begin(char*, size_t, char*, size_t, char*, char*, int) { return true; }
static inline void block_end(int) {}
static inline void launch_end() {}
static inline void barrier(int) {}
static inline void warp(int, int, int, unsigned int, unsigned int) {}
static inline void fence(int) {}
static inline void atomic(int, void*) {}
}  // namespace race
}  // namespace emu

#endif  // GPUCONV_EMU_RACECHECK
