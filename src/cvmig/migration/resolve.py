"""`cvmig resolve`: an operator's decision for a destination that holds a guest in doubt.

A destination holds a guest in doubt when its lease from the source ran out after the
guest resumed there and before the source's decision arrived (the link broke, the source
was killed): the guest is paused there, not discarded, since the source may have released
it. The source delivers its own decision as soon as it can; when it cannot (it is gone),
an operator who knows which copy is runnable tells the destination:

    cvmig resolve tcp:DEST:PORT --keep      # the source's copy is gone: run it here
    cvmig resolve tcp:DEST:PORT --discard   # the source still runs it: drop this one
"""

from __future__ import annotations

import socket
import sys

import click

from cvmig.pki import load_tls, tls_options
from cvmig.wire.channel import Channel, PeerGone, parse_uri
from cvmig.wire.frames import VERSION, FrameType, ProtocolError
from cvmig.wire.tls import TlsCreds, TlsError, client_wrap

TIMEOUT_S = 5.0


def resolve_in_doubt(uri: str, keep: bool, timeout: float = TIMEOUT_S,
                     tls: TlsCreds | None = None) -> str:
    """Send the decision; return the destination's answer. Raises ConnectionError,
    ValueError (bad URI), TlsError or RuntimeError (the destination refused)."""
    host, port = parse_uri(uri)
    decision = "released" if keep else "aborted"
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.settimeout(timeout)
        with client_wrap(raw, tls, host) as sock:  # a TLS destination: decisions over TLS
            ch = Channel(sock)
            ch.send_json(FrameType.HELLO, {"version": VERSION, "role": "operator",
                                           "decision": decision})
            f = ch.recv_frame(max_data=1 << 20)
    want = FrameType.OWNED if keep else FrameType.CANCEL
    if f.type is not want:
        raise RuntimeError(str(f.json().get("message", f.type.name)))
    return "the destination runs the guest" if keep else "the destination discarded its copy"


@click.command()
@click.argument("uri", metavar="tcp:HOST:PORT")
@click.option("--keep", "decision", flag_value="keep", help="Run the guest at the destination.")
@click.option("--discard", "decision", flag_value="discard",
              help="Discard the destination's copy (the source runs the guest).")
@tls_options
def resolve(uri: str, decision: str | None, tls_creds: str | None, tls_authz: str | None,
            tls_hostname: str | None) -> None:
    """Resolve a guest a destination holds in doubt (see `cvmig migrate`'s in-doubt exit)."""
    if decision is None:
        raise click.UsageError("say --keep (run it at the destination) or --discard")
    try:
        parse_uri(uri)
        tls = load_tls(tls_creds, tls_authz, tls_hostname)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        click.echo(resolve_in_doubt(uri, decision == "keep", tls=tls))
    except (OSError, PeerGone, ProtocolError, TlsError) as e:
        click.secho(f"cannot reach the destination at {uri}: {e}", fg="red", err=True)
        sys.exit(1)
    except RuntimeError as e:
        click.secho(f"the destination refused: {e}", fg="red", err=True)
        sys.exit(1)
