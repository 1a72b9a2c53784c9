# protected: the same greeting from 32-bit protected mode.
# The hypervisor set up what a bootloader would: a GDT with flat 4 GiB segments and CR0.PE.
        .code32
        mov     $0x3f8, %dx
        mov     $message, %esi      # 32-bit pointers now
        cld
next:   lodsb
        test    %al, %al
        jz      done
        out     %al, %dx            # EXIT: KVM_EXIT_IO
        jmp     next
done:   mov     %cr0, %eax          # show the mode: eax = CR0, bit 0 (PE) is set
        hlt                         # EXIT: KVM_EXIT_HLT
message:
        .asciz  "Hello from 32-bit protected mode!\n"
