// Shared by CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SSLOPS_HD __host__ __device__ __forceinline__
#else
#define SSLOPS_HD inline
#endif
