/* The KVM guest's program (guests/src/kvm): 64-bit code that the VMM loads at 1 MiB and
 * enters in long mode, with every guest-physical address mapped to itself by 2 MiB pages.
 * It runs one of three workloads over an area of guest pages, and on request checks the
 * whole area against the workload's invariant and reports on the first serial port:
 * (byte by byte: to the serial port at CPL 0, to the serial MMIO page at CPL 3)
 *   "check ok N\n"      all N pages hold what they must
 *   "check BAD page P\n" page P (index in the area) does not
 *   "check BAD sum ...\n" every page is whole, but one is an older version
 *
 * Workloads (CONFIG_KIND):
 *   0 idle   nothing but the LAPIC timer, 1 ms ticks, halting in between.
 *   1 sweep  the sweeper: adds one to the first 64-bit word of every page, page after
 *            page, forever. Pages before the sweep point hold one more than the pages at
 *            and after it; the sweep point lives in a register (rbx), so the check also
 *            proves that the vCPU's registers came across.
 *   2 dirty  the dirtier: writes a random number (masked to CONFIG_WORD_MASK, so 16-bit
 *            numbers compress as the synthetic dirty guest's do) into a random 32-bit
 *            word of a random page, again and again. Word 0 of every page is the XOR of
 *            its other 1023 words, and CONFIG_SUM the XOR of every page's word 0: the
 *            guest keeps both true with each write. The VMM fills the area before boot
 *            (random numbers, the sums to match). The generator state lives in r12.
 * Sweep and dirty run at CPL 3 (the VMM starts them there): where KVM is this machine's
 * paravirtual PVM, code at CPL 0 that is not PVM-aware is emulated instruction by
 * instruction (about 1 us each) while CPL 3 runs natively. Idle runs at CPL 0: it needs
 * hlt and interrupts, and does nothing else.
 * Sweep and dirty are paced by the TSC: one page every CONFIG_TSC_PER_PAGE ticks (0: no
 * pacing), busy-waiting in between as a vCPU that computes would.
 *
 * The VMM writes the configuration block before the first run and asks for a check by
 * adding one to CONFIG_CHECK_REQUESTS; the guest notices between two writes (or timer
 * ticks), sets CONFIG_CHECKS_DONE to the request it answers, and runs the check.
 * Guest pages are numbered over the flat RAM, low region then high: index i is at
 * guest-physical address i * 4096, plus CONFIG_HOLE_PAGES pages once i reaches
 * CONFIG_LOW_PAGES (the hole below 4 GiB).
 *
 * Assembled by guests/build.rs:  as --64 -o kvm_guest.o kvm_guest.S
 *                                ld -m elf_x86_64 -Ttext=0x100000 --oformat=binary ...
 * The offsets below must match guests/src/kvm/layout.rs.
 */
        .set CONFIG,                0x500
        .set CONFIG_MAGIC,          0x00
        .set CONFIG_KIND,           0x08
        .set CONFIG_AREA_FIRST,     0x10
        .set CONFIG_AREA_PAGES,     0x18
        .set CONFIG_LOW_PAGES,      0x20
        .set CONFIG_HOLE_PAGES,     0x28
        .set CONFIG_TSC_PER_PAGE,   0x30
        .set CONFIG_WORD_MASK,      0x38
        .set CONFIG_SEED,           0x40
        .set CONFIG_CHECK_REQUESTS, 0x48
        .set CONFIG_CHECKS_DONE,    0x50
        .set CONFIG_WRITES,         0x58
        .set CONFIG_TICKS,          0x60
        .set CONFIG_SUM,            0x68

        .set SERIAL,                0x3f8
        .set SERIAL_MMIO,           0xd0000000  /* in the hole below 4 GiB, no RAM there */
        .set LAPIC,                 0xfee00000
        .set TIMER_VECTOR,          0x20
        .set TIMER_COUNT,           1000000     /* 1 ms at KVM's 1 GHz APIC bus */

        .code64
        .globl _start
_start:
        movq    $CONFIG, %r15
        movq    CONFIG_KIND(%r15), %rax
        cmpq    $1, %rax
        je      sweep
        cmpq    $2, %rax
        je      dirty
        jmp     idle

/* ---- idle: LAPIC timer ticks, hlt in between ---------------------------------------- */
idle:
        lidt    idt_descriptor(%rip)
        leaq    timer_interrupt(%rip), %rax     /* the timer's gate points at its handler */
        movw    %ax, timer_gate(%rip)
        shrq    $16, %rax
        movw    %ax, timer_gate+6(%rip)
        shrq    $16, %rax
        movl    %eax, timer_gate+8(%rip)
        movl    $LAPIC, %esi
        movl    $0x1ff, 0xf0(%rsi)              /* spurious vector 0xff, APIC enabled */
        movl    $0xb, 0x3e0(%rsi)               /* timer divides by 1 */
        movl    $(TIMER_VECTOR | (1 << 17)), 0x320(%rsi)  /* periodic */
        movl    $TIMER_COUNT, 0x380(%rsi)
idle_loop:
        sti
        hlt
        cli
        call    poll_check
        jmp     idle_loop

timer_interrupt:
        pushq   %rax
        incq    CONFIG + CONFIG_TICKS
        movl    $LAPIC, %eax
        movl    $0, 0xb0(%rax)                  /* end of interrupt */
        popq    %rax
        iretq

/* ---- sweep --------------------------------------------------------------------------- */
sweep:
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, %r14                      /* r14: next pacing deadline */
        xorq    %rbx, %rbx                      /* rbx: the sweep point */
sweep_page:
        movq    %rbx, %rax
        call    area_page_address
        incq    (%rax)
        incq    %rbx
        cmpq    CONFIG_AREA_PAGES(%r15), %rbx
        jb      1f
        xorq    %rbx, %rbx
1:      incq    CONFIG_WRITES(%r15)
        call    poll_check
        call    pace
        jmp     sweep_page

/* The sweep's check: every page equals the first page, less one from the sweep point on. */
check_sweep:
        xorq    %rax, %rax
        call    area_page_address
        movq    (%rax), %r8                     /* r8: the value below the sweep point */
        xorq    %rcx, %rcx
2:      cmpq    CONFIG_AREA_PAGES(%r15), %rcx
        jae     check_passed
        movq    %rcx, %rax
        call    area_page_address
        movq    (%rax), %rdx
        movq    %r8, %r9
        cmpq    %rbx, %rcx
        jb      3f
        testq   %rbx, %rbx
        jz      3f
        decq    %r9                             /* at and after the sweep point: one less */
3:      cmpq    %r9, %rdx
        jne     check_failed
        incq    %rcx
        jmp     2b

/* ---- dirty --------------------------------------------------------------------------- */
dirty:
        movq    CONFIG_SEED(%r15), %r12
        orq     $1, %r12                        /* r12: xorshift64 state, never zero */
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, %r14
dirty_word:
        call    next_random
        mulq    CONFIG_AREA_PAGES(%r15)         /* rdx: a random page of the area */
        movq    %rdx, %r13
        call    next_random
        movq    $1023, %rcx
        mulq    %rcx                            /* rdx: a random word, 1 to 1023, less one */
        leaq    4(,%rdx,4), %r9                 /* r9: its offset in the page */
        call    next_random
        andl    CONFIG_WORD_MASK(%r15), %eax
        movl    %eax, %esi                      /* esi: the new number */
        movq    %r13, %rax
        call    area_page_address
        movl    (%rax,%r9), %ecx
        movl    %esi, (%rax,%r9)
        xorl    %esi, %ecx                      /* ecx: what changed */
        xorl    %ecx, (%rax)                    /* the page's sum */
        xorl    %ecx, CONFIG_SUM(%r15)          /* the area's sum */
        incq    CONFIG_WRITES(%r15)
        call    poll_check
        call    pace
        jmp     dirty_word

/* r12 = next xorshift64 value (and rax, the same). Clobbers nothing else. */
next_random:
        movq    %r12, %rax
        shlq    $13, %rax
        xorq    %rax, %r12
        movq    %r12, %rax
        shrq    $7, %rax
        xorq    %rax, %r12
        movq    %r12, %rax
        shlq    $17, %rax
        xorq    %rax, %r12
        movq    %r12, %rax
        ret

/* The dirty check: every page's first word is the XOR of its other 1023, and the XOR of
 * all first words is the area's sum. A torn page fails the first test (and is named); a
 * page that is a whole older version of itself passes it but fails the second. */
check_dirty:
        xorl    %r10d, %r10d                    /* r10d: XOR of the pages' sums */
        xorq    %rsi, %rsi                      /* rsi: page index */
7:      cmpq    CONFIG_AREA_PAGES(%r15), %rsi
        jae     9f
        movq    %rsi, %rax
        call    area_page_address
        xorl    %edx, %edx
        movq    $1023, %r8
8:      xorl    (%rax,%r8,4), %edx
        decq    %r8
        jnz     8b
        cmpl    (%rax), %edx
        jne     10f
        xorl    %edx, %r10d
        incq    %rsi
        jmp     7b
9:      cmpl    CONFIG_SUM(%r15), %r10d
        jne     check_failed_sum
        jmp     check_passed
10:     movq    %rsi, %rcx
        jmp     check_failed

/* ---- shared ------------------------------------------------------------------------- */

/* rax = guest-physical address of area page rax. */
area_page_address:
        addq    CONFIG_AREA_FIRST(%r15), %rax
        cmpq    CONFIG_LOW_PAGES(%r15), %rax
        jb      11f
        addq    CONFIG_HOLE_PAGES(%r15), %rax
11:     shlq    $12, %rax
        ret

/* Busy-waits for the next deadline (r14), one page every CONFIG_TSC_PER_PAGE ticks. A
 * deadline more than a page away (the TSC moved back, or the guest was paused) restarts
 * the pacing from now instead of stalling or catching up in a burst. */
pace:
        movq    CONFIG_TSC_PER_PAGE(%r15), %rcx
        testq   %rcx, %rcx
        jz      14f
12:     rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %r14, %rdx
        subq    %rax, %rdx                      /* rdx: ticks to the deadline (signed) */
        cmpq    %rcx, %rdx
        jg      13f                             /* too far ahead: restart */
        movq    %rax, %rsi
        subq    %r14, %rsi
        cmpq    $0, %rdx
        jle     15f                             /* deadline reached */
        pause
        jmp     12b
15:     cmpq    %rcx, %rsi
        jg      13f                             /* more than a page late: restart */
        addq    %rcx, %r14
        ret
13:     leaq    (%rax, %rcx), %r14
14:     ret

/* Runs the workload's check if the VMM asked for one. Keeps every register. */
poll_check:
        pushq   %rax
        movq    CONFIG_CHECK_REQUESTS(%r15), %rax
        cmpq    CONFIG_CHECKS_DONE(%r15), %rax
        popq    %rax
        jne     16f
        ret
16:     pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        pushq   %r9
        pushq   %r10
        /* Answered from here on: a request that arrives during the check gets a check
         * of its own (copying the count at the end would swallow it). */
        movq    CONFIG_CHECK_REQUESTS(%r15), %rax
        movq    %rax, CONFIG_CHECKS_DONE(%r15)
        movq    CONFIG_KIND(%r15), %rax
        cmpq    $1, %rax
        je      check_sweep
        cmpq    $2, %rax
        je      check_dirty
        jmp     check_passed                    /* idle: nothing to check */

check_passed:
        leaq    ok_text(%rip), %rsi
        call    print
        movq    CONFIG_AREA_PAGES(%r15), %rax
        cmpq    $0, CONFIG_KIND(%r15)
        jne     17f
        xorq    %rax, %rax
17:     call    print_decimal
        jmp     check_done
check_failed:                                   /* rcx: the bad page */
        leaq    bad_text(%rip), %rsi
        call    print
        movq    %rcx, %rax
        call    print_decimal
        jmp     check_done
check_failed_sum:
        leaq    bad_sum_text(%rip), %rsi
        call    print
check_done:
        movb    $'\n', %al
        call    print_char
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret

/* Prints the NUL-terminated text at rsi. */
print:
        movb    (%rsi), %al
        testb   %al, %al
        jz      18f
        call    print_char
        incq    %rsi
        jmp     print
18:     ret

/* One byte of output: to the first serial port at CPL 0 (an I/O exit), to the VMM's
 * serial MMIO page at CPL 3, where `out` would need an I/O bitmap (a store to memory no
 * slot backs exits to the VMM at any privilege level). */
print_char:
        pushq   %rdx
        movw    %cs, %dx
        testb   $3, %dl
        jnz     20f
        movw    $SERIAL, %dx
        outb    %al, %dx
        popq    %rdx
        ret
20:     movl    $SERIAL_MMIO, %edx
        movb    %al, (%rdx)
        popq    %rdx
        ret

/* Prints rax in decimal. */
print_decimal:
        leaq    digits_end(%rip), %rdi
        movq    $10, %rcx
19:     xorq    %rdx, %rdx
        divq    %rcx
        addb    $'0', %dl
        decq    %rdi
        movb    %dl, (%rdi)
        testq   %rax, %rax
        jnz     19b
        movq    %rdi, %rsi
        jmp     print

ok_text:        .asciz  "check ok "
bad_text:       .asciz  "check BAD page "
bad_sum_text:   .asciz  "check BAD sum (a page is an older version of itself)"
digits:         .fill   24, 1, 0
digits_end:     .byte   0

/* The interrupt table: every vector but the timer's goes nowhere (the guest never enables
 * interrupts outside the idle loop, and takes no exceptions). */
        .p2align 4
idt:
        .rept   TIMER_VECTOR
        .quad   0, 0
        .endr
timer_gate:
        .word   0                               /* offset 15:0, set by idle */
        .word   0x08                            /* the code segment */
        .word   0x8e00                          /* present, interrupt gate */
        .word   0                               /* offset 31:16 */
        .long   0                               /* offset 63:32 */
        .long   0
idt_end:
idt_descriptor:
        .word   idt_end - idt - 1
        .quad   idt
