/* The boot-sector test guest: a few hundred bytes that the BIOS loads at 0x7c00. It
 * enters 32-bit protected mode (flat segments, no paging, so guest memory can be
 * compared byte for byte) and then, forever, adds one to the first byte of every 4 KiB
 * page from 1 MiB to 1 MiB + 100 MiB, one page at a time with a short pause after each, and
 * writes 'S' to the first serial port after each sweep.
 *
 * At any instant every page equals its neighbour except at the one point the sweep has
 * reached: pages below it hold one more than pages at and above it (modulo 256). The pause
 * keeps the guest's dirty rate a realistic, steady one (a sweep takes seconds under TCG),
 * so that pre-copy converges.
 *
 * Assembled with GNU as:  as --32 -o sweeper.o sweeper.S
 *                         ld -m elf_i386 -Ttext=0x7c00 --oformat=binary -o sweeper.img sweeper.o
 */
        .set SWEEP_START, 0x00100000            /* 1 MiB: above the BIOS and this code */
        .set SWEEP_PAGES, 25600                 /* 100 MiB of 4 KiB pages */
        .set PAUSE_LOOPS, 20000                 /* per page; sets the dirty rate */
        .set SERIAL, 0x3f8

        .code16
        .globl _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %ss
        movw    $0x7c00, %sp
        /* A20 on through the "fast A20" port, so odd megabytes are not aliased. */
        inb     $0x92, %al
        orb     $2, %al
        andb    $0xfe, %al
        outb    %al, $0x92
        lgdtl   gdt_descriptor
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $0x08, $protected

        .code32
protected:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $0x7c00, %esp
sweep:
        movl    $SWEEP_START, %edi
        movl    $SWEEP_PAGES, %ebx
page:
        incb    (%edi)
        addl    $4096, %edi
        movl    $PAUSE_LOOPS, %ecx
pause:
        decl    %ecx
        jnz     pause
        decl    %ebx
        jnz     page
        movw    $SERIAL, %dx
        movb    $'S', %al
        outb    %al, %dx
        jmp     sweep

        .p2align 3
gdt:
        .quad   0                               /* null */
        .quad   0x00cf9a000000ffff              /* 0x08: code, flat 4 GiB */
        .quad   0x00cf92000000ffff              /* 0x10: data, flat 4 GiB */
gdt_descriptor:
        .word   gdt_descriptor - gdt - 1
        .long   gdt

        .org    510
        .byte   0x55, 0xaa
