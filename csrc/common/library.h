// The operator namespace of the compiled kernels.
//
// csrc/sslops.cpp defines every schema in SSLOPS_NS (normally `sslops`).  The
// CUDA emulator (csrc/emu) compiles that same file again with
// -DSSLOPS_NS=sslops_emu, and compiles csrc/cuda/*.cu for the CPU, so the
// emulated kernels get the very same schemas in their own namespace, defined
// once, in one place.
#pragma once

#include <torch/library.h>

#ifndef SSLOPS_NS
#define SSLOPS_NS sslops
#endif

#define SSLOPS_STR_(x) #x
#define SSLOPS_STR(x) SSLOPS_STR_(x)
// "sslops::name" (or "sslops_emu::name"), for dispatcher look-ups by name.
#define SSLOPS_QUALIFIED(name) SSLOPS_STR(SSLOPS_NS) "::" name

// TORCH_LIBRARY / TORCH_LIBRARY_IMPL paste their arguments, so the namespace
// macro is expanded one level up.
#define SSLOPS_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define SSLOPS_LIBRARY(m) SSLOPS_LIBRARY_(SSLOPS_NS, m)
#define SSLOPS_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define SSLOPS_LIBRARY_IMPL(key, m) SSLOPS_LIBRARY_IMPL_(SSLOPS_NS, key, m)
