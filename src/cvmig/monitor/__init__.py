"""QMP-compatible control: a VM process driven by the tools people use with QEMU.

``protocol`` (framing, greeting, errors, events), ``schema`` (argument checks),
``params`` (migration parameters and capabilities), ``info`` (query-migrate, live),
``machine`` (run state, guest and migrations), ``commands``, ``server`` (the UNIX
socket), ``run`` (``cvmig vm --qmp``).
"""
