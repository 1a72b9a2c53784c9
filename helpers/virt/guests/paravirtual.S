# paravirtual: write LENGTH bytes at PAYLOAD through a ring in shared memory, with ONE exit.
# A driver that knows it runs in a VM (virtio's idea) describes its buffers in guest memory
# and tells the device once: "there is work". The host reads the bytes itself.
#
# The ring is a virtio split virtqueue:
#   DESC   descriptor table, 16 bytes each: u64 addr, u32 len, u16 flags, u16 next
#   AVAIL  available ring (written by the guest): u16 flags, u16 idx, u16 ring[]
#   USED   used ring (written by the host):       u16 flags, u16 idx, {u32 id, u32 len}[]
# DEVICE is the device's register window; offset 0x50 is QueueNotify, the doorbell.
# Symbols from the host (--defsym): PAYLOAD, LENGTH, CHUNK, DESC, AVAIL, USED, DEVICE.
# The VM is fresh, so the rings start at index 0.
        .code16
        mov     $PAYLOAD, %ebx      # address of the next CHUNK of the payload
        mov     $DESC, %si          # next descriptor
        mov     $AVAIL+4, %di       # next slot of avail.ring
        xor     %ax, %ax            # descriptor number
fill:   movl    %ebx, (%si)         # desc.addr, low 32 bits
        movl    $0, 4(%si)          # desc.addr, high 32 bits
        movl    $CHUNK, 8(%si)      # desc.len
        movl    $0, 12(%si)         # desc.flags = 0 (no NEXT), desc.next = 0
        mov     %ax, (%di)          # avail.ring[n] = n: this descriptor is ready
        add     $16, %si
        add     $2, %di
        add     $CHUNK, %ebx
        inc     %ax
        cmp     $LENGTH/CHUNK, %ax
        jne     fill                # no exits in this loop: it only writes guest RAM
        mov     %ax, AVAIL+2        # avail.idx = n: publish them all at once (on x86, stores
                                    # are seen in order; other CPUs would need a write barrier)
        mov     $DEVICE>>4, %ax     # es:0 -> the device's registers (real mode: segment * 16)
        mov     %ax, %es
        movl    $0, %es:0x50        # EXIT (KVM_EXIT_MMIO): QueueNotify = queue 0, the doorbell
        mov     USED+2, %ax         # ax = used.idx: how many buffers the host has consumed
        hlt                         # EXIT (KVM_EXIT_HLT)
