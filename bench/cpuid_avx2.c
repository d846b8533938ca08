/* Make this process's CPUID say the CPU has no AVX-512, so that libraries that choose their kernels
 * at run time (onnxruntime's MLAS, its cpuinfo) take their AVX2 paths on an AVX-512 CPU: the peer
 * that bnncc's AVX2 build is measured against (bench/network.py, issue 16 item 4).
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, the "cpuid_fault" CPU flag; rr uses it) turns
 * each CPUID instruction into a SIGSEGV. The handler runs the real CPUID with faulting lifted for
 * that thread, clears the AVX-512 feature bits of leaf 7 and steps over the instruction. The setting
 * is per thread and inherited by threads created later, so call bnncc_hide_avx512 before loading the
 * library and before it starts threads.
 *
 * Build: gcc -O2 -shared -fPIC bench/cpuid_avx2.c -o cpuid_avx2.so
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* Leaf 7, subleaf 0: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL (EBX); VBMI, VBMI2, VNNI, BITALG,
 * VPOPCNTDQ (ECX); 4VNNIW, 4FMAPS, VP2INTERSECT, FP16 (EDX). Subleaf 1: AVX512_BF16 (EAX). */
#define LEAF7_EBX_AVX512 ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | \
                          (1u << 30) | (1u << 31))
#define LEAF7_ECX_AVX512 ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
#define LEAF7_EDX_AVX512 ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23))
#define LEAF7_1_EAX_AVX512 (1u << 5)

static long cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_fault(int sig, siginfo_t *info, void *context) {
    greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: let it end the process as it would have */
        signal(sig, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)regs[REG_RAX], subleaf = (unsigned)regs[REG_RCX], a, b, c, d;
    cpuid_faulting(0);
    __cpuid_count(leaf, subleaf, a, b, c, d);
    cpuid_faulting(1);
    if (leaf == 7 && subleaf == 0) {
        b &= ~LEAF7_EBX_AVX512;
        c &= ~LEAF7_ECX_AVX512;
        d &= ~LEAF7_EDX_AVX512;
    } else if (leaf == 7 && subleaf == 1) {
        a &= ~LEAF7_1_EAX_AVX512;
    }
    regs[REG_RAX] = a;
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2;
}

/* 0 when CPUID now hides AVX-512 in this thread and the threads it starts; -1 (errno set) when the
 * kernel or the CPU has no CPUID faulting. */
int bnncc_hide_avx512(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, NULL) != 0) return -1;
    return (int)cpuid_faulting(1);
}
