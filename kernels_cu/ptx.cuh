// ptx.cuh: the PTX instructions gpuconv's kernels use that CUDA C++ does not spell, as small
// device functions. Under NVRTC each is one inline `asm volatile`; under GPUCONV_EMU (the
// emulated device, gpuconv/emu_runtime/cuda_emu.h) each is emulated with the semantics the PTX
// ISA gives it. Kernels never write inline PTX themselves (tests/test_ptx.py checks), so every
// kernel runs on 'emu'.
//
// Asynchronous copies (sm_80+), global -> shared:
//   cp_async_ca<BYTES>(shared_dst, global_src, src_bytes = BYTES)  cp.async.ca, BYTES 4, 8 or 16
//   cp_async_cg16(shared_dst, global_src, src_bytes = 16)          cp.async.cg (16 bytes only)
//     src_bytes < BYTES reads only that many bytes and zero-fills the rest (0: a zero fill that
//     reads nothing, the usual way to pad an implicit-GEMM tile). Both addresses BYTES-aligned.
//   cp_async_commit()       cp.async.commit_group: the copies issued since the last commit
//                           become one group
//   cp_async_wait<N>()      cp.async.wait_group N: all but the N most recent groups have landed
//   cp_async_wait_all()     cp.async.wait_all: every copy, committed or not, has landed
//   A copy lands at some moment before the wait that covers it, and only the issuing thread's
//   wait covers it: other threads need a __syncthreads() after that wait. The emulator makes the
//   latest moment the rule: it poisons the destination at issue (0xFF bytes, NaN as float) and
//   copies at the wait, so a read before the wait reads NaN. Copies still in flight when a
//   thread exits never land.
//
// Conversions:
//   to_tf32(x)          cvt.rna.tf32.f32: round to nearest, ties away from zero, to TF32's 10
//                       mantissa bits; returns the bits (low 13 zero), as mma's operands take them
//   pack_bf16x2(lo, hi) cvt.rn.bf16x2.f32: both rounded to nearest even to bfloat16, lo in the low
//                       half (the element with the lower index in a fragment)
//
// Warp-collective tensor-core instructions (sm_80+); all 32 lanes of the warp must execute them
// together (.sync.aligned), which the emulator checks:
//   mma_tf32_m16n8k8(d, a, b)   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += A*B
//   mma_bf16_m16n8k16(d, a, b)  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, d += A*B
//     Fragments (PTX ISA "Matrix Fragments for mma.m16n8k8 / m16n8k16"), with g = lane / 4 and
//     t = lane % 4:
//       tf32 A (16x8, row-major):  a[i] = A[g + 8*(i % 2)][t + 4*(i / 2)]
//       tf32 B (8x8, column):      b[i] = B[t + 4*i][g]
//       bf16 A (16x16): a[i] holds A[g + 8*(i % 2)][2t + 8*(i / 2) + h], h = 0 low half, 1 high
//       bf16 B (16x8):  b[i] holds B[2t + 8*i + h][g]
//       C/D (16x8, f32):  d[i] = D[g + 8*(i / 2)][2t + i % 2]
//     FP32 accumulate. The emulator sums each instruction's products (exact for TF32 and BF16
//     operands) in double and rounds once to float; the hardware's internal order differs from
//     that by a few FP32 ulps. The ISA expects TF32 operands in TF32 format (to_tf32); the
//     emulator truncates any bits below the 10 mantissa bits of one that is not.
//   ldmatrix<COUNT, TRANS>(r, shared_row)  ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16:
//     COUNT 8x8 matrices of 16-bit elements; lane 8*i + j gives the address of row j of matrix
//     i (16-byte aligned; lanes past 8*COUNT give none). r[i] = elements (g, 2t) low and
//     (g, 2t + 1) high of matrix i, or with TRANS (2t, g) and (2t + 1, g). The emulator reads
//     each row as its lane reaches the instruction, the earliest moment the hardware could.
//     With 32-bit data an 8x8 matrix of halves is an 8x4 block of words, lane (g, t) getting
//     word (g, t): a TF32 mma fragment.

#ifndef GPUCONV_EMU

__device__ __forceinline__ unsigned int shared_address(const void* p)
{
    return (unsigned int)__cvta_generic_to_shared(p);
}

template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* shared_dst, const void* global_src, int src_bytes = BYTES)
{
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(shared_dst)),
                 "l"(global_src), "n"(BYTES), "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_cg16(void* shared_dst, const void* global_src, int src_bytes = 16)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_dst)),
                 "l"(global_src), "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ unsigned int to_tf32(float x)
{
    unsigned int bits;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
    return bits;
}

__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi)
{
    unsigned int bits;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(bits) : "f"(hi), "f"(lo));  // first source -> high half
    return bits;
}

__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int COUNT, bool TRANS>
__device__ __forceinline__ void ldmatrix(unsigned int (&r)[COUNT], const void* shared_row)
{
    static_assert(COUNT == 1 || COUNT == 2 || COUNT == 4, "ldmatrix loads 1, 2 or 4 matrices");
    const unsigned int p = shared_address(shared_row);
    if constexpr (COUNT == 1 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
    else if constexpr (COUNT == 1)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
    else if constexpr (COUNT == 2 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(p));
    else if constexpr (COUNT == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(p));
    else if constexpr (!TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(p));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(p));
}

#else  // GPUCONV_EMU: the same functions, emulated on the fibers of cuda_emu.h.

// The emulator's own bookkeeping (each thread's copies in flight, the warp exchange slots) is not
// kernel memory: functions marked EMU_PTX_BOOKKEEPING touch it unseen by ThreadSanitizer (the
// race-checking build). What a copy does to memory (the poison at issue, the landing at the wait)
// happens in unmarked functions, so the race detector sees it as the issuing thread's.
#define EMU_PTX_BOOKKEEPING __attribute__((no_sanitize("thread"), noinline))

namespace emu_ptx {

constexpr int kMaxThreads = 1024;
// Copies one thread may have in flight; a pipeline of a few stages needs a few dozen.
constexpr int kMaxCopies = 128;

struct Copy {
    char* dst;
    const char* src;
    int bytes, src_bytes;
};

// One thread's copies in issue order; the committed groups end at group_end[0 .. groups), the
// copies after the last end belong to no group yet.
struct ThreadCopies {
    Copy copies[kMaxCopies];
    int count, groups;
    int group_end[kMaxCopies];
};

static ThreadCopies thread_copies[kMaxThreads];
// Warp collectives alternate between two exchange slots per warp: a lane writes slot s of its
// next collective only after the whole warp has passed the collective that used slot s^1, and
// so after every lane finished reading slot s two collectives ago.
constexpr int kWords = 6;  // an mma's A and B fragments
static unsigned long long exchange[kMaxThreads / 32][2][32][kWords];
static unsigned int collectives_done[kMaxThreads];

EMU_PTX_BOOKKEEPING static void reset_thread(int thread)
{
    thread_copies[thread].count = thread_copies[thread].groups = 0;
    collectives_done[thread] = 0;
}
static const bool registered = (emu::reset_thread_state = &reset_thread, true);

static inline int thread_index() { return (int)(emu::current - emu::fibers); }

static inline bool in_shared(const void* p, int bytes)
{
    const char* c = static_cast<const char*>(p);
    const bool dynamic = c >= emu_dynamic_shared && c + bytes <= emu_dynamic_shared + sizeof emu_dynamic_shared;
    const bool fixed = __start_emu_shared && c >= __start_emu_shared && c + bytes <= __stop_emu_shared;
    return dynamic || fixed;
}

// A copy's effect on memory, as the issuing thread's accesses.
static void poison(char* dst, int bytes)
{
    for (int i = 0; i < bytes; ++i) dst[i] = (char)0xff;  // in flight: undefined until the wait
}

static void perform(const Copy& c)
{
    for (int i = 0; i < c.src_bytes; ++i) c.dst[i] = c.src[i];
    for (int i = c.src_bytes; i < c.bytes; ++i) c.dst[i] = 0;
}

EMU_PTX_BOOKKEEPING static void record(const char* what, void* dst, const void* src, int bytes, int src_bytes)
{
    if (((uintptr_t)dst | (uintptr_t)src) % (uintptr_t)bytes)
        emu::fail_in_fiber(emu::WARP_MISUSE, "%s: addresses %p (shared) and %p (global) must be %d-byte aligned", what,
                           dst, src, bytes);
    if (!in_shared(dst, bytes))
        emu::fail_in_fiber(emu::WARP_MISUSE, "%s: destination %p is not in shared memory", what, dst);
    if (in_shared(src, 1))
        emu::fail_in_fiber(emu::WARP_MISUSE, "%s: source %p is in shared memory, not global", what, src);
    if (src_bytes < 0 || src_bytes > bytes)
        emu::fail_in_fiber(emu::WARP_MISUSE, "%s: src_bytes %d must be in [0, %d]", what, src_bytes, bytes);
    ThreadCopies& t = thread_copies[thread_index()];
    if (t.count == kMaxCopies)
        emu::fail_in_fiber(emu::WARP_MISUSE, "%s: more than %d copies in flight in one thread (the emulator's limit)",
                           what, kMaxCopies);
    t.copies[t.count++] = {static_cast<char*>(dst), static_cast<const char*>(src), bytes, src_bytes};
}

static void issue(const char* what, void* dst, const void* src, int bytes, int src_bytes)
{
    record(what, dst, src, bytes, src_bytes);
    poison(static_cast<char*>(dst), bytes);
}

// Lands this thread's copies of every group but the `pending` most recent (all its copies, group
// or not, when pending < 0) and forgets them.
EMU_PTX_BOOKKEEPING static void land(int pending)
{
    ThreadCopies& t = thread_copies[thread_index()];
    if (pending >= 0 && t.groups <= pending) return;
    const int done = pending < 0 ? t.groups : t.groups - pending;
    const int n = pending < 0 ? t.count : t.group_end[done - 1];
    for (int i = 0; i < n; ++i) perform(t.copies[i]);
    for (int i = n; i < t.count; ++i) t.copies[i - n] = t.copies[i];
    t.count -= n;
    for (int g = done; g < t.groups; ++g) t.group_end[g - done] = t.group_end[g] - n;
    t.groups -= done;
}

EMU_PTX_BOOKKEEPING static void commit()
{
    ThreadCopies& t = thread_copies[thread_index()];
    // A copy may land any time before its wait: landing the oldest group early keeps the record
    // bounded when a loop commits (empty) groups it never waits for.
    if (t.groups == kMaxCopies) land(t.groups - 1);
    t.group_end[t.groups++] = t.count;
}

// Rounds to TF32 (cvt.rna) on the bits: adding half an ulp of the 10-bit mantissa to the
// magnitude and truncating rounds ties away from zero; NaN and infinity keep their class.
static inline unsigned int tf32_bits(float x)
{
    unsigned int u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? (u | 0x00400000u) & 0xffffe000u : u;
    return (u + 0x1000u) & 0xffffe000u;
}

static inline unsigned int bf16_bits(float x)
{
    unsigned int u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return ((u & 0x007fffffu) ? (u | 0x00400000u) : u) >> 16;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest, ties to even
}

static inline float float_of(unsigned int bits)
{
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

using Lanes = const unsigned long long (*)[kWords];

// Publishes this lane's words and returns the slot of the current collective.
EMU_PTX_BOOKKEEPING static Lanes publish(const unsigned long long* words, int n)
{
    const int thread = thread_index(), warp = thread / 32;
    const int slot = (int)(collectives_done[thread]++ & 1u);
    for (int i = 0; i < n; ++i) exchange[warp][slot][thread % 32][i] = words[i];
    return exchange[warp][slot];
}

// Waits for the whole warp at a warp-collective instruction and returns the exchanged words of
// every lane. An instruction that not all 32 lanes execute is an error.
static Lanes collective(const char* what, const unsigned long long* words, int n)
{
    Lanes lanes = publish(words, n);
    const unsigned int present = __ballot_sync(0xffffffffu, 1);
    const int warp = thread_index() / 32, in_block = emu::fiber_count - warp * 32;
    if (present != 0xffffffffu || in_block < 32)
        emu::fail_in_fiber(emu::WARP_MISUSE,
                           "%s: only lanes 0x%08x of warp %d execute it (%d in the block); all 32 lanes of the warp "
                           "must execute it together",
                           what, present, warp, in_block < 32 ? in_block : 32);
    return lanes;
}

// The A (16 x depth) and B (depth x 8) operands of an mma, from every lane's fragments.
EMU_PTX_BOOKKEEPING static void gather_tf32(Lanes l, float (&a)[16][16], float (&b)[16][8])
{
    const auto element = [](unsigned long long w) { return float_of((unsigned int)w & 0xffffe000u); };  // low bits ignored
    for (int r = 0; r < 16; ++r)
        for (int k = 0; k < 8; ++k) a[r][k] = element(l[(r % 8) * 4 + k % 4][r / 8 + 2 * (k / 4)]);
    for (int k = 0; k < 8; ++k)
        for (int n = 0; n < 8; ++n) b[k][n] = element(l[n * 4 + k % 4][4 + k / 4]);
}

EMU_PTX_BOOKKEEPING static void gather_bf16(Lanes l, float (&a)[16][16], float (&b)[16][8])
{
    const auto half = [](unsigned long long w, int h) { return float_of(((unsigned int)w >> (16 * h)) << 16); };
    for (int r = 0; r < 16; ++r)
        for (int k = 0; k < 16; ++k) a[r][k] = half(l[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k % 2);
    for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 8; ++n) b[k][n] = half(l[n * 4 + (k % 8) / 2][4 + k / 8], k % 2);
}

// This lane's four elements of D += A*B, each sum of products in double, rounded once.
static void mma_tile(float (&d)[4], int depth, const float (&a)[16][16], const float (&b)[16][8])
{
    const int lane = thread_index() % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        double sum = 0.0;
        for (int k = 0; k < depth; ++k) sum += (double)a[row][k] * (double)b[k][col];
        d[i] = (float)((double)d[i] + sum);
    }
}

// Element `col` (16-bit) of the row lane `source` read for an ldmatrix.
EMU_PTX_BOOKKEEPING static unsigned int row_element(Lanes l, int source, int col)
{
    return (unsigned int)(l[source][col / 4] >> (16 * (col % 4))) & 0xffffu;
}

}  // namespace emu_ptx

template <int BYTES>
static inline void cp_async_ca(void* shared_dst, const void* global_src, int src_bytes = BYTES)
{
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    emu_ptx::issue("cp.async.ca", shared_dst, global_src, BYTES, src_bytes);
}

static inline void cp_async_cg16(void* shared_dst, const void* global_src, int src_bytes = 16)
{
    emu_ptx::issue("cp.async.cg", shared_dst, global_src, 16, src_bytes);
}

static inline void cp_async_commit() { emu_ptx::commit(); }

template <int N>
static inline void cp_async_wait()
{
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    emu_ptx::land(N);
}

static inline void cp_async_wait_all() { emu_ptx::land(-1); }

static inline unsigned int to_tf32(float x) { return emu_ptx::tf32_bits(x); }

static inline unsigned int pack_bf16x2(float lo, float hi)
{
    return emu_ptx::bf16_bits(lo) | emu_ptx::bf16_bits(hi) << 16;
}

static inline void mma_tf32_m16n8k8(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
    const unsigned long long words[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    float am[16][16], bm[16][8];
    emu_ptx::gather_tf32(emu_ptx::collective("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", words, 6), am, bm);
    emu_ptx::mma_tile(d, 8, am, bm);
}

static inline void mma_bf16_m16n8k16(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
    const unsigned long long words[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    float am[16][16], bm[16][8];
    emu_ptx::gather_bf16(emu_ptx::collective("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", words, 6), am, bm);
    emu_ptx::mma_tile(d, 16, am, bm);
}

template <int COUNT, bool TRANS>
static inline void ldmatrix(unsigned int (&r)[COUNT], const void* shared_row)
{
    static_assert(COUNT == 1 || COUNT == 2 || COUNT == 4, "ldmatrix loads 1, 2 or 4 matrices");
    static const char* const name = TRANS ? (COUNT == 1 ? "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16"
                                             : COUNT == 2 ? "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16"
                                                          : "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")
                                          : (COUNT == 1 ? "ldmatrix.sync.aligned.m8n8.x1.shared.b16"
                                             : COUNT == 2 ? "ldmatrix.sync.aligned.m8n8.x2.shared.b16"
                                                          : "ldmatrix.sync.aligned.m8n8.x4.shared.b16");
    const int lane = emu_ptx::thread_index() % 32;
    if (lane < 8 * COUNT && ((uintptr_t)shared_row % 16 || !emu_ptx::in_shared(shared_row, 16)))
        emu::fail_in_fiber(emu::WARP_MISUSE, "%s: lane %d's row address %p is not a 16-byte aligned shared address",
                           name, lane, shared_row);
    // Each lane reads its row when it reaches the instruction: a read that needs a barrier or a
    // wait first shows, as for any other load, in the thread order that runs it early.
    unsigned long long row_bits[2] = {0, 0};
    if (lane < 8 * COUNT) memcpy(row_bits, shared_row, 16);
    const emu_ptx::Lanes lanes = emu_ptx::collective(name, row_bits, 2);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < COUNT; ++i) {
        unsigned int value = 0;
        for (int h = 0; h < 2; ++h) {
            const int row = TRANS ? 2 * t + h : g, col = TRANS ? g : 2 * t + h;
            value |= emu_ptx::row_element(lanes, 8 * i + row, col) << (16 * h);
        }
        r[i] = value;
    }
}

#endif  // GPUCONV_EMU
