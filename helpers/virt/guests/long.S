# long: the same greeting from 64-bit long mode.
# The hypervisor set up page tables (identity map, 2 MiB pages), CR4.PAE, EFER.LME and CR0.PG.
        .code64
        mov     $0x3f8, %dx
        lea     message(%rip), %rsi # rip-relative addressing exists only in 64-bit mode
        cld
next:   lodsb
        test    %al, %al
        jz      done
        out     %al, %dx            # EXIT: KVM_EXIT_IO
        jmp     next
done:   movabs  $0x1122334455667788, %rax   # a value only a 64-bit register can hold
        hlt                         # EXIT: KVM_EXIT_HLT
message:
        .asciz  "Hello from 64-bit long mode!\n"
