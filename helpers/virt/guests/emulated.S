# emulated: write LENGTH bytes at PAYLOAD to an emulated UART (COM1), one `out` per byte.
# The guest needs no special driver: it talks to what looks like real hardware, and every
# `out` traps to the hypervisor, which emulates the UART in software. LENGTH exits.
# Symbols from the host (--defsym): PAYLOAD, LENGTH.
        .code16
        mov     $PAYLOAD, %si       # ds:si -> the bytes to write
        mov     $LENGTH, %cx
        mov     $0x3f8, %dx         # COM1's transmit register
        cld
next:   lodsb                       # al = *si++
        out     %al, %dx            # EXIT (KVM_EXIT_IO): the host takes one byte
        loop    next                # cx -= 1, again until 0
        hlt                         # EXIT (KVM_EXIT_HLT)
