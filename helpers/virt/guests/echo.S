# echo: send back what arrives on COM1, until nothing more is waiting. Real mode.
# Shows the other direction of port I/O: an `in` exits too, and the hypervisor puts the
# answer (the UART's status, then the byte) in the guest's al before it resumes.
        .code16
poll:   mov     $0x3fd, %dx         # the line status register
        in      %dx, %al            # EXIT (KVM_EXIT_IO, in): is a byte waiting?
        test    $1, %al             # bit 0, "data ready"
        jz      done
        mov     $0x3f8, %dx         # the receive/transmit register
        in      %dx, %al            # EXIT (KVM_EXIT_IO, in): take the byte
        out     %al, %dx            # EXIT (KVM_EXIT_IO, out): send it back
        jmp     poll
done:   hlt                         # EXIT (KVM_EXIT_HLT)
