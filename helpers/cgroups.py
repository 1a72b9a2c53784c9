"""Control groups, v1 and v2 behind one API.

This machine kind is *hybrid*: the resource controllers sit on v1 hierarchies under
``/sys/fs/cgroup/<controller>`` and a controller-less cgroup2 is mounted at
``/sys/fs/cgroup/unified``. Most students' machines are v2 only.
"""
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Which cgroup hierarchies are mounted, and which controllers each one has."""
    v1: dict = field(default_factory=dict)   # controller -> mount point
    v2: Path | None = None                    # cgroup2 mount point
    v2_controllers: tuple = ()

    @property
    def version(self):
        if self.v1 and self.v2:
            return "hybrid"
        return "v1" if self.v1 else "v2" if self.v2 else "none"


def detect(mountinfo="/proc/self/mountinfo"):
    v1, v2 = {}, None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, point, options = fields[sep + 1], fields[4], fields[sep + 3].split(",")
            if fstype == "cgroup2" and v2 is None:
                v2 = Path(point)
            elif fstype == "cgroup":
                for opt in options:
                    if opt.startswith("name="):
                        continue
                    if opt not in ("rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
                                   "clone_children", "noprefix", "xattr") \
                            and not opt.startswith("release_agent="):
                        v1.setdefault(opt, Path(point))
    controllers = ()
    if v2 is not None:
        try:
            controllers = tuple((v2 / "cgroup.controllers").read_text().split())
        except OSError:
            pass
    return Layout(v1=v1, v2=v2, v2_controllers=controllers)


def sweep():
    """Nothing yet: cgroups arrive with the cgroups chapter."""
