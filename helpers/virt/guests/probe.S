# probe: find a virtio-mmio style device the way a driver does, by reading its registers.
# There is no RAM at DEVICE, so every access is a VM exit (KVM_EXIT_MMIO) that the
# hypervisor answers on the device's behalf. Real mode; DEVICE comes from the host.
        .code16
        mov     $DEVICE>>4, %ax     # es:0 -> the register window (real mode: segment * 16)
        mov     %ax, %es
        mov     %es:0x000, %eax     # EXIT (MMIO read): MagicValue, "virt" in ASCII
        mov     %es:0x004, %ebx     # EXIT (MMIO read): Version
        mov     %es:0x008, %ecx     # EXIT (MMIO read): DeviceID, 3 = console
        movl    $3, %es:0x070       # EXIT (MMIO write): Status = ACKNOWLEDGE | DRIVER
        hlt                         # EXIT (KVM_EXIT_HLT)
