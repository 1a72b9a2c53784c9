"""Part 1, virtualization: a hypervisor in Python on /dev/kvm (``kvm``), emulated versus
paravirtual devices (``paravirt``), a real Linux guest under QEMU (``vm``, ``initramfs``), and the
VM-versus-container measurement of lab 13 (``compare``)."""
