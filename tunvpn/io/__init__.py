"""The I/O shell: the kernel-facing pieces (tun device, netlink) the daemons drive the core with."""
