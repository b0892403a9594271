/* Hide AVX-512, VNNI and AMX from CPUID in this process, so that libraries which pick their kernels from CPUID
 * (ONNX Runtime's MLAS, numpy, OpenBLAS, torch) take their AVX2 paths on a host that has more.
 *
 * Loaded with LD_PRELOAD by benchmarks/on_avx2_path.py. Its constructor turns on the kernel's CPUID faulting
 * (arch_prctl ARCH_SET_CPUID 0, Linux >= 4.12 on a CPU with the cpuid_fault flag): every CPUID instruction then
 * raises SIGSEGV, whose handler runs the real CPUID (faulting off for that one instruction), clears the feature bits
 * below and steps over the instruction. Faulting is kept across fork and clone (threads) and reset by execve, where
 * LD_PRELOAD, still in the environment, loads this library again. A SIGSEGV that is not a CPUID goes to the default
 * action (the process dies as it would have). The dynamic loader reads CPUID before any constructor runs: the
 * wrapper sets GLIBC_TUNABLES so that glibc's own string functions drop AVX-512 too.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* CPUID leaf 7 sub-leaf 0: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL (EBX); VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
 * (ECX); 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8 (EDX). Sub-leaf 1: AVX-VNNI,
 * AVX512-BF16 (EAX). */
#define LEAF7_EBX \
    ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
#define LEAF7_ECX ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
#define LEAF7_EDX ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
#define LEAF7_1_EAX ((1u << 4) | (1u << 5))

static long cpuid_enabled(unsigned long on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not CPUID: let the fault take its default course */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)regs[REG_RAX], sub = (uint32_t)regs[REG_RCX], a, b, c, d;
    cpuid_enabled(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    cpuid_enabled(0);
    if (leaf == 7 && sub == 0) {
        b &= ~LEAF7_EBX;
        c &= ~LEAF7_ECX;
        d &= ~LEAF7_EDX;
    } else if (leaf == 7 && sub == 1) {
        a &= ~LEAF7_1_EAX;
    }
    regs[REG_RAX] = a; /* CPUID writes the 32-bit registers, which zeroes their upper halves */
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2;
}

__attribute__((constructor)) static void hide_avx512(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, 0);
    if (cpuid_enabled(0) != 0) {
        static const char message[] = "hide_avx512: this kernel or CPU has no CPUID faulting (arch_prctl "
                                      "ARCH_SET_CPUID); refusing to run on the wrong code path\n";
        ssize_t ignored = write(2, message, sizeof message - 1);
        (void)ignored;
        _exit(97);
    }
}
