# hello: the smallest useful guest. Real mode (16-bit, like a PC right after reset).
# Writes a greeting to COM1, one `out` per byte, then halts.
# Every `out` is a VM exit: the hypervisor (Python) receives the byte and emulates the UART.
        .code16
        mov     $0x3f8, %dx         # COM1's transmit register
        mov     $message, %si       # ds:si -> the message (ds = 0: flat low memory)
        cld                         # lodsb walks forwards
next:   lodsb                       # al = *si++
        test    %al, %al
        jz      done                # the message ends with a 0 byte
        out     %al, %dx            # EXIT: KVM_EXIT_IO, direction out, port 0x3f8
        jmp     next
done:   hlt                         # EXIT: KVM_EXIT_HLT, the run is over
message:
        .asciz  "Hello from real mode!\n"
