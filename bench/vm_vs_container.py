"""Start-up cost of a VM vs a container, from one run: medians of a few starts each.

The VM is Debian's cloud kernel with a busybox initramfs under QEMU (KVM where it boots, TCG
otherwise): time from starting QEMU to the guest's init, and QEMU's peak RSS. The container is
`docker run --rm` of the course's busybox image: time from the API call to its first output,
and its cgroup's peak memory plus its containerd shim's RSS.

    python bench/vm_vs_container.py [RUNS]
"""
import sys

from helpers import compare

STARTERS = {
    "VM (QEMU)": compare.start_vm,
    "container (docker run --rm)": compare.start_container,
}


def main(runs=3):
    measured = {what: compare.measure(start, runs=runs) for what, start in STARTERS.items()}
    print(f"vm_vs_container: medians of {runs} starts each")
    print(f"  {'':30} {'start':>9} {'memory':>11}   counted")
    for what, start in measured.items():
        counted = " + ".join(f"{part} {size / 2**20:.1f} MiB" for part, size in start.memory.items())
        print(f"  {what:30} {start.seconds:7.3f} s {start.total_memory / 2**20:7.1f} MiB   {counted}")
    machine, container = measured.values()
    print(f"  VM accelerator: {machine.note}")
    print(f"  the VM took {machine.seconds / container.seconds:.1f}x as long to start "
          f"and {machine.total_memory / container.total_memory:.1f}x the memory")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
