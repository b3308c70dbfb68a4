"""QMP-compatible control: a VM process driven by the tools people use with QEMU.

``protocol`` (framing, greeting, errors, events), ``schema`` (argument checks, as QEMU's
input visitor), ``params`` (migration parameters and capabilities: the QMP face of
`cvmig.migration.parameters`), ``introspect`` (query-qmp-schema), ``machine`` (run state,
guest and migrations, events at their moments), ``commands``, ``server`` (the UNIX
socket), ``run`` (``cvmig vm --qmp``); query-migrate's figures live in
`cvmig.migration.live`.
"""
