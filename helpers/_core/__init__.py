"""The private core: what every part of the course stands on, and imports nothing above it.

- ``libc``: the syscalls Python 3.11's ``os`` lacks (unshare, setns, mount, pivot_root, prctl);
- ``names``: where the course keeps its things, and the ``cnlab`` prefix it names them with;
- ``procfs``: processes, command lines and mounts, read from /proc;
- ``wait``: waiting for a condition with a deadline;
- ``daemon``: one way to run a server process, so that it dies with the process that started it;
- ``owners``: the registry ``helpers.cleanup()`` and ``helpers.leftovers()`` walk;
- ``loop``: the thread, stop flag and action log every controller in the course shares.
"""
