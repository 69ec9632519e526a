"""L5: `kvmfilter serve` - one VM per process behind a QMP control socket.

- ``qmp``: the wire protocol (JSON-stream framing, errors, events).
- ``commands``: the command table with argument schemas.
- ``server``: sockets, clients, signals, the event pump, lifecycle.
- ``metrics``: the Prometheus textfile; ``notify``: sd_notify, socket
  activation, the watchdog; ``listen``: the socket path.
- ``client``: the blocking client behind `kvmfilter query`, `watch`, `migrate`.
"""
