"""The administrator's commands: fsck."""
from __future__ import annotations

import click

from .. import format as fmt
from ..errors import EX_DATAERR
from . import common

FIXABLE = ("orphan_blob", "temp_file", "corrupt_blob", "link", "stray")


@click.command()
@click.option("--repair", is_flag=True, help="Remove orphan blobs, temp files, links among the blobs and "
              "corrupt blobs (never a model's manifest: broken models are reported).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def fsck(ctx, repair, as_json):
    """Check the store: every blob's digest, every manifest's schema and references.

    Exit status 0 when nothing is left to fix, 65 when problems remain."""
    report = common.client(ctx).fsck(repair=repair)
    if as_json:
        fmt.echo_json(report)
    else:
        click.echo(render(report))
    if report.get("unresolved"):
        raise click.exceptions.Exit(EX_DATAERR)


def render(report: dict) -> str:
    """The report for people: what was checked, one line per problem, and the verdict."""
    c, r = report["checked"], report["removed"]
    lines = [f"checked {c['manifests']} manifest(s), {c['blobs']} blob(s) ({fmt.size(c['bytes'])})"]
    for p in report["problems"]:
        lines.append(f"{p['kind']}: {p['what']}: {p['detail']} [{p['action']}]")
    if report.get("repair") and report.get("skipped"):
        lines.append(f"orphans and temp files kept: {report['skipped']}")
    if report["repair"] and any(r.values()):
        lines.append(f"removed {r['blobs']} blob(s) ({fmt.size(r['bytes'])}), {r['temp_files']} temp "
                     f"file(s), {r['links']} link(s)")
    left = report.get("unresolved", 0)
    if report["clean"]:
        lines.append("clean")
    elif not left:
        lines.append("repaired")
    else:
        fixable = any(p["kind"] in FIXABLE and p["action"] == "reported" for p in report["problems"])
        lines.append(f"{left} problem(s) left" + ("; 'llmctl fsck --repair' removes what nobody needs"
                                                  if fixable else ""))
    return "\n".join(lines)


COMMANDS = [fsck]
