// activation.cu -- elementwise activations and their gradients.
//
// Versions: relu_forward_v1, relu_backward_v1, tanh_forward_v1, tanh_backward_v1,
// sigmoid_forward_v1, sigmoid_backward_v1.
//
// Forward kernels (x, y, n): y[i] = f(x[i]) with relu(x) = x < 0 ? 0 : x (NaN propagates, as in
//   PyTorch), tanh(x) = tanhf(x), sigmoid(x) = 1 / (1 + expf(-x)).
// Backward kernels (grad_y, y, grad_x, n) take the forward *output* y, from which each gradient
//   follows without the input: relu: y > 0 ? grad_y : 0; tanh: grad_y * (1 - y^2);
//   sigmoid: grad_y * y * (1 - y).
// Layout: any, as flat arrays of n float32 elements; outputs must not alias inputs.
// Launch shape: 1-D grid-stride loop; block (256), grid (any, e.g. ceil(n / 1024) capped); no
//   shared memory. When every pointer is 16-byte aligned the body moves float4s (n / 4 of them,
//   then a scalar tail of n % 4); otherwise (e.g. a view at an odd offset) it runs scalar.
// Limits: n < 2^63.

__device__ __forceinline__ bool aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0ull;
}

template <class Op>
__device__ __forceinline__ float4 apply4(Op op, float4 a) {
    return make_float4(op(a.x), op(a.y), op(a.z), op(a.w));
}

template <class Op>
__device__ __forceinline__ float4 apply4(Op op, float4 a, float4 b) {
    return make_float4(op(a.x, b.x), op(a.y, b.y), op(a.z, b.z), op(a.w, b.w));
}

// y[i] = op(x[i]) over the grid; float4 body when aligned, scalar tail.
template <class Op>
__device__ __forceinline__ void map1(Op op, const float* __restrict__ x, float* __restrict__ y, long long n) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long scalar_from = 0;
    if (aligned16(x) && aligned16(y)) {
        const long long n4 = n / 4;
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* y4 = reinterpret_cast<float4*>(y);
        for (long long i = first; i < n4; i += stride) y4[i] = apply4(op, x4[i]);
        scalar_from = n4 * 4;
    }
    for (long long i = scalar_from + first; i < n; i += stride) y[i] = op(x[i]);
}

// z[i] = op(a[i], b[i]) over the grid; float4 body when aligned, scalar tail.
template <class Op>
__device__ __forceinline__ void map2(Op op, const float* __restrict__ a, const float* __restrict__ b,
                                     float* __restrict__ z, long long n) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long scalar_from = 0;
    if (aligned16(a) && aligned16(b) && aligned16(z)) {
        const long long n4 = n / 4;
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        float4* z4 = reinterpret_cast<float4*>(z);
        for (long long i = first; i < n4; i += stride) z4[i] = apply4(op, a4[i], b4[i]);
        scalar_from = n4 * 4;
    }
    for (long long i = scalar_from + first; i < n; i += stride) z[i] = op(a[i], b[i]);
}

struct Relu {
    __device__ __forceinline__ float operator()(float x) const { return x < 0.f ? 0.f : x; }
};
struct ReluGrad {
    __device__ __forceinline__ float operator()(float g, float y) const { return y > 0.f ? g : 0.f; }
};
struct Tanh {
    __device__ __forceinline__ float operator()(float x) const { return tanhf(x); }
};
struct TanhGrad {
    __device__ __forceinline__ float operator()(float g, float y) const { return g * (1.f - y * y); }
};
struct Sigmoid {
    __device__ __forceinline__ float operator()(float x) const { return 1.f / (1.f + expf(-x)); }
};
struct SigmoidGrad {
    __device__ __forceinline__ float operator()(float g, float y) const { return g * y * (1.f - y); }
};

extern "C" __global__ void relu_forward_v1(const float* __restrict__ x, float* __restrict__ y, long long n) {
    map1(Relu(), x, y, n);
}
extern "C" __global__ void relu_backward_v1(const float* __restrict__ grad_y, const float* __restrict__ y,
                                            float* __restrict__ grad_x, long long n) {
    map2(ReluGrad(), grad_y, y, grad_x, n);
}
extern "C" __global__ void tanh_forward_v1(const float* __restrict__ x, float* __restrict__ y, long long n) {
    map1(Tanh(), x, y, n);
}
extern "C" __global__ void tanh_backward_v1(const float* __restrict__ grad_y, const float* __restrict__ y,
                                            float* __restrict__ grad_x, long long n) {
    map2(TanhGrad(), grad_y, y, grad_x, n);
}
extern "C" __global__ void sigmoid_forward_v1(const float* __restrict__ x, float* __restrict__ y, long long n) {
    map1(Sigmoid(), x, y, n);
}
extern "C" __global__ void sigmoid_backward_v1(const float* __restrict__ grad_y, const float* __restrict__ y,
                                               float* __restrict__ grad_x, long long n) {
    map2(SigmoidGrad(), grad_y, y, grad_x, n);
}
