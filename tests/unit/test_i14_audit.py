"""Issue 14: refusals are in the audit trail (INFO, with the uid), like granted actions."""
import logging

from llmctl.errors import InvalidArgument, PermissionDenied
from llmosd.server import Peer, audit_refusal


def test_i14_permission_denied_is_logged_with_the_uid(caplog):
    peer = Peer(b"x", "/run/llmosd.sock:1234:1234:99")
    with caplog.at_level(logging.INFO, logger="llmosd.server"):
        audit_refusal(peer, "rm", PermissionDenied("model a belongs to alice (uid 1000)").to_wire())
        audit_refusal(peer, "rm", InvalidArgument("not a refusal").to_wire())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused rm by uid 1234: model a belongs to alice (uid 1000)"]
